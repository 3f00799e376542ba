"""The candidate-accuracy benchmarks on a tiny pretraining run: where they score a checkpoint as its own evaluation
did (validation images, evaluation transform, BatchNorm on running statistics, the summary as it is), they give the
run's own validation candidate accuracy, and their other settings score the same images."""

import pytest
from torch.utils.data import DataLoader

from benchmarks import candidate_accuracy_by_transform, held_out_accuracy, stress_multiprocess, summary_contribution
from modeling_selfie import SelfieForImageClassification
from tests.utils import pretrain, tiny_config


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


def test_another_number_of_hidden_patches_scores_selfies_own_task_on_it(parquet_folder, tmp_path):
    """A checkpoint of the split objective (8 of 16 hidden) scored on the paper's task, 4 of 16 hidden at random: one
    direction, 4 candidates, and the same figure from the benchmark as from the model it loads."""
    flags = [
        "--dataset_name",
        str(parquet_folder),
        *FLAGS,
        "--max_steps",
        "2",
        "--config_overrides",
        "masking_strategy=split",
    ]
    assert pretrain(tmp_path, *flags)["eval_candidate_accuracy"] >= 0
    model, processor, splits = candidate_accuracy_by_transform.load_checkpoint(
        str(tmp_path), str(parquet_folder), 16, num_masked_patches=4
    )
    assert (model.config.masking_strategy, model.config.num_masked_patches) == ("random", 4)
    images = splits["validation"]
    transform = candidate_accuracy_by_transform.image_transform(processor, train=False)
    # One batch of all the images, as the benchmark reads them, so that their masks are the benchmark's: each read of
    # the masked images draws its masks from where the stream of seed 0 stands.
    masked = candidate_accuracy_by_transform.masked_images(images, transform, model.config)
    batch = next(
        iter(DataLoader(masked, batch_size=len(images), collate_fn=candidate_accuracy_by_transform.collate_images))
    )
    model.eval()
    outputs = model(batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
    assert outputs.logits.shape == (len(images), 4, 4) and outputs.reverse_logits is None
    accuracies = candidate_accuracy_by_transform.main(
        [str(tmp_path), "--dataset_name", str(parquet_folder), *FLAGS, "--num_masked_patches", "4"]
    )
    assert accuracies["validation", "evaluation", False] == pytest.approx(outputs.accuracy.item(), abs=1e-6)


def test_a_number_of_hidden_patches_the_grid_cannot_hold_is_refused_in_one_line(pretrained, parquet_folder, capsys):
    output_dir, _ = pretrained
    with pytest.raises(SystemExit) as exit_info:
        candidate_accuracy_by_transform.main(
            [str(output_dir), "--dataset_name", str(parquet_folder), *FLAGS, "--num_masked_patches", "16"]
        )
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "num_masked_patches" in message and "16" in message


def test_a_checkpoint_without_the_pretraining_networks_is_refused(tmp_path, parquet_folder):
    """A classifier with the "resnet" head holds no attention pooling network, whose weights would be random."""
    SelfieForImageClassification(tiny_config()).save_pretrained(tmp_path)
    message = rf"^{tmp_path} is not a pretraining checkpoint: it has no weights for \d+ of the pretraining model's"
    with pytest.raises(ValueError, match=message):
        candidate_accuracy_by_transform.load_checkpoint(str(tmp_path), str(parquet_folder))


@pytest.mark.parametrize(
    "main, flags, message",
    [
        (
            candidate_accuracy_by_transform.main,
            ["CHECKPOINT", "--dataset_name", "D", "--samples", "0"],
            "--samples: 0",
        ),
        (
            summary_contribution.main,
            ["CHECKPOINT", "--dataset_name", "D", "--max_eval_samples", "-1"],
            "--max_eval_samples: -1",
        ),
        (held_out_accuracy.main, ["SWEEP.json", "--draws", "0"], "--draws: 0"),
        (held_out_accuracy.main, ["SWEEP.json", "--batch_size", "x"], "--batch_size: 'x' is not a whole number"),
        (stress_multiprocess.main, ["--runs", "0"], "--runs: 0"),
    ],
)
def test_the_benchmarks_refuse_bad_counts_before_any_work(monkeypatch, capsys, main, flags, message):
    """--samples 0 ended in a ZeroDivisionError after the model and data were loaded; --draws, --batch_size and
    --runs were taken unchecked."""
    monkeypatch.setattr("sys.argv", ["benchmark", *flags])  # stress_multiprocess reads sys.argv itself
    with pytest.raises(SystemExit) as exit_info:
        main(flags) if main is not stress_multiprocess.main else main()
    assert exit_info.value.code == 2
    assert f"error: argument {message}" in capsys.readouterr().err.splitlines()[-1]
