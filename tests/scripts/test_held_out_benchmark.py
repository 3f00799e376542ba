"""The held-out benchmark on a tiny sweep of the digits: its validation figures are the runs' own, the others are the
held-out images the runs never scored, and all of them are both together."""

import json

import pytest

from benchmarks import held_out_accuracy
from selfie_training import sweep as run_sweep
from selfie_training.errors import UserError
from tests.utils import TINY_MODEL


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    """Two seeds of both methods at 50% of the digits' labels, scored on 100 of the 180 held-out digits."""
    root = tmp_path_factory.mktemp("held-out")
    quiet = {"report_to": "none", "disable_tqdm": True, "per_device_train_batch_size": 16, "max_steps": 3}
    sweep = {
        "output_dir": str(root / "sweep"),
        "label_fractions": [0.5],
        "seeds": [0, 1],
        "data": {"max_eval_samples": 100, **TINY_MODEL},
        "pretraining": quiet,
        "finetuning": quiet,
    }
    (root / "sweep.json").write_text(json.dumps(sweep))
    run_sweep.main([str(root / "sweep.json")])
    return root / "sweep.json"


def test_validation_figures_are_the_runs_own_and_all_images_add_up(sweep_file, capsys):
    rows = held_out_accuracy.main([str(sweep_file), "--draws", "50"])
    output = sweep_file.parent / "sweep"
    assert json.loads((output / "held_out.json").read_text())["results"] == json.loads(json.dumps(rows))
    (row,) = rows
    assert row["label_fraction"] == 0.5 and row["seeds"] == [0, 1]
    assert [row[part]["images"] for part in held_out_accuracy.PARTS] == [100, 80, 180]
    reported = {r["label_fraction"]: r for r in json.loads((output / "results.json").read_text())["results"]}[0.5]
    for method in ("scratch", "selfie"):
        assert row["validation"][method]["runs"] == pytest.approx(reported[method]["runs"], abs=0.005)
        for validation, others, every in zip(
            *(row[part][method]["runs"] for part in held_out_accuracy.PARTS), strict=True
        ):
            assert every == pytest.approx((100 * validation + 80 * others) / 180, abs=0.01)
        spread = row["std_over_draws"][method]
        assert 0 <= spread["p5"] <= spread["median"] <= spread["p95"]
    gains = [b - a for a, b in zip(row["others"]["scratch"]["runs"], row["others"]["selfie"]["runs"], strict=True)]
    assert row["others"]["gain"] == pytest.approx(sum(gains) / 2, abs=0.01)
    assert 0 <= row["std_over_draws"]["share_with_selfie_at_most_scratch"] <= 1
    assert "| 50% | others (80) |" in capsys.readouterr().out


def test_a_run_scored_on_other_images_than_these_is_refused(sweep_file, tmp_path):
    sweep = json.loads(sweep_file.read_text())
    results = sweep_file.parent / "sweep" / "finetuning" / "selfie-0.5-seed1" / "eval_results.json"
    figures = json.loads(results.read_text())
    try:  # half an image of 100 off: no accuracy on the first 100 held-out images can match it
        results.write_text(json.dumps({**figures, "eval_accuracy": figures["eval_accuracy"] + 0.005}))
        with pytest.raises(
            UserError, match=r"selfie-0\.5-seed1 scores .* on the first 100 held-out images but reported"
        ):
            held_out_accuracy.main([str(sweep_file), "--draws", "5"])
    finally:
        results.write_text(json.dumps(figures))

    sweep["data"]["max_eval_samples"] = 500  # more than the 180 held out: the runs were scored on all of them
    (tmp_path / "all.json").write_text(json.dumps(sweep))
    with pytest.raises(UserError, match=r"the runs were scored on all 180 held-out images: none is left over"):
        held_out_accuracy.main([str(tmp_path / "all.json")])
