"""docs/results.md and the README's results tables are what `make report` writes from docs/results/*.json."""

import json
import re

from selfie_training import report
from selfie_training.sweep import markdown_table
from tests.utils import REPOSITORY


DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]


def test_the_committed_report_is_a_fresh_generation(tmp_path):
    generated = tmp_path / "results.md"
    generated.write_text(report.report())
    assert report.REPORT.read_text() == generated.read_text(), "docs/results.md is stale: run `make report`"


def test_the_readme_tables_are_the_reports_rows_of_the_same_files():
    readme = report.README.read_text()
    tables = report.readme_tables()
    assert tables.keys() == {"digits", "cifar10-cpu", "objectives", "cifar10-gpu"}
    for name, table in tables.items():
        assert f"<!-- report:{name} -->\n{table}\n<!-- /report:{name} -->" in readme, f"run `make report` ({name})"
    assert report.refresh_tables(readme, tables) == readme


def test_the_performance_tables_are_the_benchmarks_files():
    performance = report.PERFORMANCE.read_text()
    loop = report.performance_tables()["loop"]
    files = sorted(report.RESULTS.glob("throughput-cpu-loop-*.json"))
    assert len(loop.splitlines()) == 2 + 2 * len(files) > 2  # a pretraining and a fine-tuning row a file
    assert report.refresh_tables(performance, report.performance_tables()) == performance, "run `make report`"


def test_the_digits_table_is_the_one_the_locked_environment_printed():
    """The README's demo table is docs/results/digits.json's, the results.json of `make demo`, which records the
    versions it ran with: they must be the ones requirements-lock.txt installs, or the table is another
    environment's. After `make lock`, run `make demo`, copy outputs/digits/results.json there and `make report`."""
    digits = report.load("digits.json")
    assert digits["command"] == "python run_sweep.py configs/digits.json"  # what `make demo` runs
    lock = dict(
        re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
        for line in (REPOSITORY / "requirements-lock.txt").read_text().splitlines()
        if re.match(r"[A-Za-z0-9]", line)
    )
    locked = {name.lower().replace("_", "-"): version for name, version in lock.items()}
    recorded = {name.lower().replace("_", "-"): version for name, version in digits["environment"].items()}
    recorded.pop("python")
    assert recorded == {name: locked[name] for name in recorded}, "the demo ran in another environment than the lock"
    assert f"<!-- report:digits -->\n{markdown_table(digits['results'])}\n" in report.README.read_text()


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
