"""The candidate-accuracy benchmarks on a tiny pretraining run: where they score a checkpoint as its own evaluation
did (validation images, evaluation transform, BatchNorm on running statistics, the summary as it is), they give the
run's own validation candidate accuracy, and their other settings score the same images."""

import sys

import pytest

from tests.utils import REPOSITORY, pretrain


sys.path.insert(0, str(REPOSITORY / "benchmarks"))
import candidate_accuracy_by_transform  # noqa: E402
import summary_contribution  # noqa: E402


FLAGS = ["--max_eval_samples", "16"]


@pytest.fixture
def pretrained(parquet_folder, tmp_path):
    """A 3-step pretraining run with MLP queries (so that the summary matters), and its evaluation metrics."""
    flags = ["--dataset_name", str(parquet_folder), *FLAGS, "--max_steps", "3", "--config_overrides", "query_type=mlp"]
    return tmp_path, pretrain(tmp_path, *flags)


def test_the_summary_as_it_is_gives_the_runs_own_candidate_accuracy(pretrained, parquet_folder):
    output_dir, metrics = pretrained
    accuracies = summary_contribution.main([str(output_dir), "--dataset_name", str(parquet_folder), *FLAGS])
    assert list(accuracies) == ["as it is", "set to zero", "of another image"]
    assert accuracies["as it is"] == pytest.approx(metrics["eval_candidate_accuracy"], abs=1e-6)
    assert all(0 <= accuracy <= 1 for accuracy in accuracies.values())


def test_validation_images_under_the_evaluation_transform_give_the_runs_own_candidate_accuracy(
    pretrained, parquet_folder
):
    output_dir, metrics = pretrained
    accuracies = candidate_accuracy_by_transform.main([str(output_dir), "--dataset_name", str(parquet_folder), *FLAGS])
    transforms = ("training (pretraining's)", "training (unaligned)", "training (padded)", "evaluation")
    assert set(accuracies) == {
        (split, transform, on_batch)
        for split in ("train", "validation")
        for transform in transforms
        for on_batch in (False, True)
    }
    assert accuracies["validation", "evaluation", False] == pytest.approx(metrics["eval_candidate_accuracy"], abs=1e-6)
