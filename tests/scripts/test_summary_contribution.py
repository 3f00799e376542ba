"""benchmarks/summary_contribution.py on a tiny pretraining run: the summary as it is gives the run's own validation
candidate accuracy, and the swapped summaries are scored on the same images and masks."""

import sys

import pytest

from tests.utils import REPOSITORY, pretrain


sys.path.insert(0, str(REPOSITORY / "benchmarks"))
import summary_contribution  # noqa: E402


def test_the_summary_as_it_is_gives_the_runs_own_candidate_accuracy(parquet_folder, tmp_path):
    flags = ["--dataset_name", str(parquet_folder), "--max_eval_samples", "16"]
    metrics = pretrain(tmp_path, *flags, "--max_steps", "3", "--config_overrides", "query_type=mlp")
    accuracies = summary_contribution.main([str(tmp_path), *flags])
    assert list(accuracies) == ["as it is", "set to zero", "of another image"]
    assert accuracies["as it is"] == pytest.approx(metrics["eval_candidate_accuracy"], abs=1e-6)
    assert all(0 <= accuracy <= 1 for accuracy in accuracies.values())
