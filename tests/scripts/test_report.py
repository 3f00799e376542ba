"""docs/results.md and the README's results tables are what `make report` writes from docs/results/*.json."""

import json
import re
import shutil

from selfie_training import report
from tests.utils import REPOSITORY


DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]


def test_the_committed_report_is_a_fresh_generation(tmp_path):
    generated = tmp_path / "results.md"
    generated.write_text(report.report())
    assert report.REPORT.read_text() == generated.read_text(), "docs/results.md is stale: run `make report`"


def test_the_readme_tables_are_the_reports_rows_of_the_same_files():
    readme = report.README.read_text()
    tables = report.readme_tables()
    assert {"cifar10-cpu", "cifar10-gpu"} <= tables.keys()
    for name, table in tables.items():
        assert f"<!-- report:{name} -->\n{table}\n<!-- /report:{name} -->" in readme, f"run `make report` ({name})"
    assert report.refresh_readme(readme, tables) == readme


def test_the_digits_table_is_the_sweeps_own_once_its_file_is_committed(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    row = {"mean": 40.0, "std": 1.0, "runs": [39.0, 41.0]}
    digits = {
        "command": "make demo",
        "environment": {"torch": "2.14.1"},
        "results": [{"label_fraction": 0.05, "scratch": row, "selfie": {**row, "mean": 50.0}, "delta": 10.0}],
    }
    (results / "digits.json").write_text(json.dumps(digits))
    table = report.readme_tables(results)["digits"]
    assert "| 5% | 40.0 ± 1.0 | 50.0 ± 1.0 | +10.0 |" in table
    assert table in report.report(results) and "make demo" in report.report(results)
    readme = "<!-- report:digits -->\nold\n<!-- /report:digits -->\n"
    assert (
        report.refresh_readme(readme, {"digits": table})
        == f"<!-- report:digits -->\n{table}\n<!-- /report:digits -->\n"
    )


def test_every_result_file_records_its_environment_and_the_report_shows_it():
    text = report.report()
    for path in sorted(report.RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        assert "environment" in data, path.name
        assert f"| [{path.name}](results/{path.name}) | {report.environment(data)} |" in text


def test_links_into_docs_resolve():
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.name} links to {target}, which is missing"


def test_the_readme_and_docs_name_no_commits():
    hexadecimal = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{7,40}(?![0-9A-Za-z])")
    for document in DOCUMENTS:
        hashes = [word for word in hexadecimal.findall(document.read_text()) if re.search(r"\d", word)]
        assert not [word for word in hashes if re.search("[a-f]", word)], document.name
