"""End-to-end runs of the training scripts on tiny data written by the tests."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from modeling_selfie import SelfieForImageClassification
from selfie_training import pretraining as run_pretraining
from selfie_training import sweep as run_sweep
from selfie_training.data import DataArguments, load_splits
from tests.utils import (
    QUIET_FLAGS,
    REPOSITORY,
    TINY_MODEL,
    TINY_MODEL_FLAGS,
    fine_tune,
    launch_two_processes,
    pretrain,
)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_pretraining_on_an_unlabelled_image_folder(tmp_path, image_folder):
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for index, path in enumerate(sorted(image_folder.rglob("*.png"))):
        shutil.copy(path, flat / f"{index}.png")
    output = tmp_path / "pretrained"
    metrics = pretrain(
        output,
        "--train_dir",
        str(flat),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "2",
        "--report_to",
        "tensorboard",
    )

    assert 0 <= metrics["eval_candidate_accuracy"] <= 1 and math.isfinite(metrics["eval_loss"])
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_selfie.py",
        "README.md",
        "all_results.json",
        "train_results.json",
        "eval_results.json",
        "trainer_state.json",
    ):
        assert (output / name).is_file(), name
    assert read_json(output / "all_results.json")["eval_candidate_accuracy"] == metrics["eval_candidate_accuracy"]
    logged = [entry for entry in read_json(output / "trainer_state.json")["log_history"] if "loss" in entry]
    assert len(logged) == 2 and all(0 <= entry["candidate_accuracy"] <= 1 for entry in logged)
    assert list(output.glob("runs/*/events.out.tfevents.*"))  # --report_to tensorboard
    card = (output / "README.md").read_text()
    assert "pretrained with Selfie" in card and "candidate_accuracy" in card and "@article{trinh2019selfie" in card
    assert "4 of 16 patches hidden" in card


def test_pretraining_with_the_split_objective_logs_each_term_and_names_it(tmp_path):
    output = tmp_path / "split"
    # --config_overrides replaces TINY_MODEL's: its fields, and the objective (num_masked_patches follows: 8 of 16).
    overrides = f"{TINY_MODEL['config_overrides']},masking_strategy=split,image_contrastive_weight=0.5"
    metrics = pretrain(
        output,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "2",
        "--max_eval_samples",
        "16",
        "--config_overrides",
        overrides,
    )
    config = read_json(output / "config.json")
    assert (config["masking_strategy"], config["num_masked_patches"], config["image_contrastive_weight"]) == (
        "split",
        8,
        0.5,
    )
    logged = [entry for entry in read_json(output / "trainer_state.json")["log_history"] if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:  # the loss is the weighted sum of the two terms logged beside it (each rounded to 1e-4)
        assert entry["loss"] == pytest.approx(
            entry["patch_selection_loss"] + 0.5 * entry["image_contrastive_loss"], abs=1e-3
        )
        assert entry["image_contrastive_loss"] > 0 and 0 <= entry["candidate_accuracy"] <= 1
    assert 0 <= metrics["eval_candidate_accuracy"] <= 1
    objective = (
        "SplitMask split-and-match, halves of 8 and 8 patches filling in each other, plus 0.5 x image-level InfoNCE"
    )
    assert read_json(output / "training_stages.json")["training_stages"][-1]["objective"] == objective
    card = (output / "README.md").read_text()
    assert f"Objective: {objective}." in card and f"Selfie pretraining on sklearn-digits ({objective})" in card
    assert "- masking_strategy: split" in card and "- image_contrastive_weight: 0.5" in card


def test_fine_tuning_on_parquet_with_an_image_feature(tmp_path, parquet_folder):
    output = tmp_path / "classifier"
    metrics = fine_tune(
        output,
        "--dataset_name",
        str(parquet_folder),
        *TINY_MODEL_FLAGS,
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--train_val_split",
        "0.25",
        "--eval_strategy",
        "epoch",
    )
    assert 0 <= metrics["eval_accuracy"] <= metrics["eval_top5_accuracy"] <= 1  # 6 classes: top-5 reported
    config = read_json(output / "config.json")
    assert config["id2label"] == {str(i): f"c{i}" for i in range(6)}
    card = (output / "README.md").read_text()
    assert "trained from scratch" in card and 'pipeline("image-classification"' in card
    assert "| Epoch |" in card  # the evaluation log table

    predictions = pipeline("image-classification", model=str(output))(Image.new("RGB", (32, 32), (255, 0, 128)))
    assert {p["label"] for p in predictions} <= {f"c{i}" for i in range(6)}


def test_pretrain_then_fine_tune_starts_from_the_pretrained_patch_network(tmp_path, image_folder):
    pretrained = tmp_path / "pretrained"
    pretrain(pretrained, "--train_dir", str(image_folder), "--max_steps", "3", "--per_device_train_batch_size", "8")
    checkpoint = load_file(pretrained / "model.safetensors")

    # A zero learning rate leaves every parameter where it started (BatchNorm statistics still move).
    frozen = [
        "--train_dir",
        str(image_folder),
        "--max_steps",
        "2",
        "--learning_rate",
        "0",
        "--per_device_train_batch_size",
        "8",
    ]
    fine_tune(tmp_path / "selfie", "--model_name_or_path", str(pretrained), *frozen)
    fine_tune(tmp_path / "scratch", "--config_name", str(pretrained), *frozen)

    for run, starts_from_checkpoint in (("selfie", True), ("scratch", False)):
        model = SelfieForImageClassification.from_pretrained(tmp_path / run)
        patch_network = dict(model.selfie.patch_network.named_parameters())
        assert patch_network, run
        same = [torch.equal(p, checkpoint[f"selfie.patch_network.{name}"]) for name, p in patch_network.items()]
        assert all(same) if starts_from_checkpoint else not any(same[:1]), run
        assert model.config.backbone == "resnet18"  # the same architecture either way


def test_labelled_subset_is_class_balanced_and_independent_of_the_training_seed(tmp_path):
    def subset(name, seed, label_seed):
        fine_tune(
            tmp_path / name,
            *TINY_MODEL_FLAGS,
            "--label_fraction",
            "0.05",
            "--seed",
            str(seed),
            "--label_seed",
            str(label_seed),
            "--max_steps",
            "1",
            "--do_eval",
            "False",
        )
        return read_json(tmp_path / name / "labelled_subset.json")["train_indices"]

    first = subset("a", seed=1, label_seed=0)
    assert subset("b", seed=2, label_seed=0) == first
    assert subset("c", seed=1, label_seed=1) != first

    all_labels = load_splits(DataArguments())["train"]["label"]
    chosen = [all_labels[index] for index in first]
    for digit in range(10):
        assert chosen.count(digit) == round(0.05 * all_labels.count(digit))


@pytest.mark.parametrize("resident_images", ["True", "False"])  # batches made on the device, or image by image
def test_resume_after_an_interruption_continues_from_the_saved_step_to_the_same_end(
    tmp_path, image_folder, resident_images
):
    flags = [
        "--resident_images",
        resident_images,
        "--train_dir",
        str(image_folder),
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
    ]
    uninterrupted = pretrain(tmp_path / "uninterrupted", *flags)

    output = tmp_path / "interrupted"
    pretrain(output, *flags)
    # What a run killed after its step-3 checkpoint leaves behind, that checkpoint's state marked:
    for path in output.iterdir():
        if path.name != "checkpoint-3":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    state_file = output / "checkpoint-3" / "trainer_state.json"
    state = read_json(state_file)
    state["log_history"][0]["marker"] = "from checkpoint-3"
    state_file.write_text(json.dumps(state))

    resumed = pretrain(output, *flags)  # the same command again

    state = read_json(output / "trainer_state.json")
    assert state["global_step"] == 6
    assert state["log_history"][0]["marker"] == "from checkpoint-3"  # steps 1-3 come from the checkpoint ...
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4, 5, 6]  # ... 4-6 once
    # ... and end where the uninterrupted run ended (same batches, augmentation and masks; CPU arithmetic):
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    for name, tensor in load_file(output / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name
    for metric in ("eval_loss", "eval_candidate_accuracy"):
        assert resumed[metric] == uninterrupted[metric]


def test_arguments_from_a_json_file(tmp_path, parquet_folder):
    arguments = {
        "dataset_name": str(parquet_folder),
        "output_dir": str(tmp_path / "run"),
        "do_train": True,
        "max_steps": 1,
        "report_to": "none",
        **TINY_MODEL,
    }
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    run_pretraining.main([str(tmp_path / "args.json")])
    config = read_json(tmp_path / "run" / "config.json")
    assert config["backbone_kwargs"] == {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}
    assert config["hidden_size"] == 32


def test_streaming(tmp_path, parquet_folder):
    streamed = [
        "--dataset_name",
        str(parquet_folder),
        "--streaming",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--max_eval_samples",
        "8",
    ]
    metrics = pretrain(tmp_path / "pretrained", *streamed, "--batchnorm_recalibration_samples", "6")
    assert 0 <= metrics["eval_candidate_accuracy"] <= 1
    # A stream has no length: the card names the number asked for.
    assert "BatchNorm statistics re-estimated on 6 whole images" in (tmp_path / "pretrained" / "README.md").read_text()
    metrics = fine_tune(tmp_path / "classifier", "--model_name_or_path", str(tmp_path / "pretrained"), *streamed)
    assert 0 <= metrics["eval_accuracy"] <= 1
    assert "streamed" in (tmp_path / "classifier" / "README.md").read_text()


def test_separate_validation_folder_and_the_attention_pooling_head(tmp_path, image_folder):
    pretrained = tmp_path / "pretrained"
    pretrain(pretrained, "--train_dir", str(image_folder), "--max_steps", "1", "--per_device_train_batch_size", "8")
    metrics = fine_tune(
        tmp_path / "classifier",
        "--train_dir",
        str(image_folder),
        "--validation_dir",
        str(image_folder),
        "--model_name_or_path",
        str(pretrained),
        "--classifier_head",
        "attention_pooling",
        "--max_steps",
        "1",
    )
    assert metrics["eval_samples_per_second"] > 0
    assert read_json(tmp_path / "classifier" / "eval_results.json")["eval_accuracy"] == metrics["eval_accuracy"]
    model = SelfieForImageClassification.from_pretrained(tmp_path / "classifier")
    assert model.config.classifier_head == "attention_pooling" and model.layer4 is None
    assert (
        "the attention pooling network and a linear classifier" in (tmp_path / "classifier" / "README.md").read_text()
    )


def test_embedded_default_dataset(tmp_path):
    metrics = pretrain(
        tmp_path / "digits", "--max_steps", "2", "--per_device_train_batch_size", "16", "--max_eval_samples", "32"
    )
    assert math.isfinite(metrics["eval_loss"])
    assert "sklearn-digits" in (tmp_path / "digits" / "README.md").read_text()


def test_sweep_writes_the_table_the_plot_and_the_cards(tmp_path, image_folder):
    quiet = {"report_to": "none", "disable_tqdm": True, "per_device_train_batch_size": 8, "max_steps": 2}
    sweep = {
        "output_dir": str(tmp_path / "sweep"),
        "label_fractions": [0.5, 1.0],
        "seeds": [0, 1],
        "data": {"train_dir": str(image_folder), "train_val_split": 0.25, **TINY_MODEL},
        "pretraining": quiet,
        "finetuning": quiet,
    }
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    rows = run_sweep.main([str(tmp_path / "sweep.json")])

    output = tmp_path / "sweep"
    results = read_json(output / "results.json")
    assert [row["label_fraction"] for row in results["results"]] == [0.5, 1.0]
    for row in results["results"]:
        for method in ("scratch", "selfie"):
            runs = row[method]["runs"]
            assert len(runs) == 2 and row[method]["mean"] == pytest.approx(sum(runs) / 2)
        assert row["delta"] == pytest.approx(row["selfie"]["mean"] - row["scratch"]["mean"])
    assert rows == results["results"]
    table = (output / "results.md").read_text()
    assert (
        "| labelled | supervised (scratch) | Selfie | delta |" in table and "| 50% |" in table and "| 100% |" in table
    )
    assert (output / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for card in (output / "pretraining" / "README.md", output / "finetuning" / "selfie-0.5-seed1" / "README.md"):
        assert "## Pretraining against training from scratch" in card.read_text()
        assert "| 50% |" in card.read_text()
    # The same labelled images for both methods:
    assert read_json(output / "finetuning" / "selfie-0.5-seed1" / "labelled_subset.json") == read_json(
        output / "finetuning" / "scratch-0.5-seed1" / "labelled_subset.json"
    )


def test_two_processes_with_accelerate_launch(tmp_path, parquet_folder):
    result = launch_two_processes(
        REPOSITORY / "run_pretraining.py",
        "--use_cpu",
        "True",
        "--dataset_name",
        str(parquet_folder),
        "--output_dir",
        str(tmp_path / "ddp"),
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--log_level",
        "info",
        *TINY_MODEL_FLAGS,
        *QUIET_FLAGS,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stdout + result.stderr
    for rank in (0, 1):  # every process says which it is, and of how many
        assert f"Process rank: {rank}, world size: 2, device: cpu" in result.stdout + result.stderr
    assert read_json(tmp_path / "ddp" / "trainer_state.json")["global_step"] == 2
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
