"""Bad input, faults and interruptions: clear one-line errors, and no loss of what was already written."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from safetensors.torch import load_file

from modeling_selfie import SelfieForMaskedPatchPrediction
from selfie_training.errors import TrainingStopped
from tests.utils import QUIET_FLAGS, REPOSITORY, TINY_MODEL_FLAGS, fine_tune, pretrain


def bert_checkpoint(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    return root


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config_overrides", "patch_size=7"], r"SelfieConfig\.patch_size=7 must divide image_size 32"),
        (
            ["--config_overrides", "num_masked_patches=16"],
            r"SelfieConfig\.num_masked_patches=16 must be an int from 2 to 15",
        ),
        (
            ["--backbone", "vit_base_patch16_224"],
            r"SelfieConfig\.backbone='vit_base_patch16_224' must name a timm ResNet",
        ),
        (
            ["--image_column_name", "picture"],
            r"--image_column_name 'picture' is not a column of the dataset; its columns are \['image', 'label'\]",
        ),
        (["--dataset_name", "/no/such/folder"], r"--dataset_name /no/such/folder: Couldn't find any data file"),
        (
            ["--unknown_flag", "1"],
            r"Some specified arguments are not used by the HfArgumentParser: \['--unknown_flag', '1'\]",
        ),
        (
            ["--dataloader_persistent_workers", "True", "--dataloader_num_workers", "0"],
            r"^--dataloader_persistent_workers keeps the DataLoader's workers between epochs, and "
            r"--dataloader_num_workers 0 starts none",
        ),
    ],
)
def test_bad_pretraining_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        pretrain(tmp_path / "run", "--max_steps", "1", *flags)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_fine_tuning_flags_and_checkpoints_fail_before_training(tmp_path, pretrained):
    cases = [
        (["--label_column_name", "species"], r"--label_column_name 'species' is not a column"),
        (["--label_fraction", "0.001"], r"--label_fraction 0.001 asks for 0 images of class 0 but it has"),
        (["--label_fraction", "1.5"], r"--label_fraction 1.5 must be in \(0, 1\]"),
        (
            ["--label_fraction", "0.1", "--labels_per_class", "5"],
            r"Give --label_fraction or --labels_per_class, not both",
        ),
        (["--model_name_or_path", str(bert_checkpoint(tmp_path / "bert"))], r"holds a 'bert' model, not a Selfie one"),
        (["--config_name", str(tmp_path / "nothing")], r"--config_name .*nothing: no readable config.json"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", *flags)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "pickle only"])
def test_missing_or_corrupt_weights_are_named(tmp_path, pretrained, damage):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (checkpoint / name).write_bytes((pretrained / name).read_bytes())
    if damage == "corrupt":
        (checkpoint / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes()[:100])
    if damage == "pickle only":  # never unpickled: pickle files can run code
        torch.save(
            SelfieForMaskedPatchPrediction.from_pretrained(pretrained).state_dict(), checkpoint / "pytorch_model.bin"
        )
    with pytest.raises(ValueError, match=r"--model_name_or_path .*checkpoint: no readable model.safetensors"):
        fine_tune(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")


def test_a_classifier_for_other_classes_needs_ignore_mismatched_sizes(tmp_path, parquet_folder):
    digits = tmp_path / "digits"
    fine_tune(digits, *TINY_MODEL_FLAGS, "--max_steps", "1", "--do_eval", "False")  # 10 classes
    flags = ["--model_name_or_path", str(digits), "--dataset_name", str(parquet_folder), "--max_steps", "1"]  # 6
    with pytest.raises(
        ValueError, match=r"classifies 10 classes but the dataset has 6: add --ignore_mismatched_sizes"
    ):
        fine_tune(tmp_path / "run", *flags)
    metrics = fine_tune(tmp_path / "run", *flags, "--ignore_mismatched_sizes")
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_a_classifier_of_other_class_names_is_refused_naming_them(tmp_path, image_folder):
    """As many classes under other names (a folder renamed): the checkpoint's class ids would be read as others'."""
    classifier = tmp_path / "classifier"
    fine_tune(
        classifier, *TINY_MODEL_FLAGS, "--train_dir", str(image_folder), "--max_steps", "1", "--do_eval", "False"
    )
    (image_folder / "class_0").rename(image_folder / "class_9")
    flags = ["--model_name_or_path", str(classifier), "--train_dir", str(image_folder), "--do_train", "False"]
    message = (
        f"--model_name_or_path {classifier} classifies ['class_0', 'class_1', 'class_2'] but the dataset's classes "
        "are ['class_1', 'class_2', 'class_9'] (['class_9'] are not among its classes): its class ids would be read "
        "as other classes."
    )
    for extra in ([], ["--ignore_mismatched_sizes"]):  # which starts afresh only tensors of another shape
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            fine_tune(tmp_path / "evaluation", *flags, *extra)
    assert not (tmp_path / "evaluation" / "all_results.json").exists()


def test_validation_labels_outside_the_classes_are_refused(tmp_path, image_folder):
    validation = tmp_path / "validation"
    for name in ("class_0", "class_9"):
        (validation / name).mkdir(parents=True)
        next(image_folder.rglob("*.png")).rename(validation / name / "0.png")
    with pytest.raises(
        ValueError, match=r"The validation split's classes \['class_0', 'class_9'\] differ from train's"
    ):
        fine_tune(
            tmp_path / "run", *TINY_MODEL_FLAGS, "--train_dir", str(image_folder), "--validation_dir", str(validation)
        )
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    next(image_folder.rglob("*.png")).rename(unlabelled / "0.png")
    with pytest.raises(ValueError, match=r"A split has no label column 'label'; its columns are \['image'\]"):
        fine_tune(
            tmp_path / "run", *TINY_MODEL_FLAGS, "--train_dir", str(image_folder), "--validation_dir", str(unlabelled)
        )


@pytest.mark.parametrize("script", ["run_pretraining", "run_image_classification", "run_evaluation"])
def test_an_output_dir_that_is_a_file_is_refused_and_left_alone(tmp_path, script):
    output = tmp_path / "notes.txt"
    output.write_text("the user's notes")
    main = __import__(script).main
    flags = ["--config_name", str(tmp_path)] if script == "run_evaluation" else ["--do_train", "--max_steps", "1"]
    with pytest.raises(ValueError, match=rf"^--output_dir {output} is a file, not a folder"):
        main(["--output_dir", str(output), *TINY_MODEL_FLAGS, *QUIET_FLAGS, *flags])
    assert output.read_text() == "the user's notes"


def test_scripts_report_user_errors_in_one_line_with_status_2(tmp_path):
    command = [
        sys.executable,
        str(REPOSITORY / "run_pretraining.py"),
        "--output_dir",
        str(tmp_path),
        "--do_train",
        "--config_overrides",
        "num_masked_patches=40",
        *QUIET_FLAGS,
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert error_lines == [
        "run_pretraining.py: error: SelfieConfig.num_masked_patches=40 must be an int from 2 to 15 (the 4x4 grid less "
        "at least one visible patch)."
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("logging_steps", "stopped_at"),
    [("1", 3), ("100", 4)],  # at the log of step 3; at the checkpoint of step 4, before any weights are written
)
def test_a_non_finite_loss_stops_the_run_before_it_logs_or_saves_again(
    tmp_path, monkeypatch, logging_steps, stopped_at
):
    """The loss is read back only when the trainer logs or saves (reading it at every step would make the host wait
    for the device at every step): the run stops there, naming the step, and no checkpoint holds its weights."""
    original_forward = SelfieForMaskedPatchPrediction.forward
    calls = []

    def forward(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(SelfieForMaskedPatchPrediction, "forward", forward)
    output = tmp_path / "run"
    stopped = rf"the checkpoints in .* are intact \(the run stopped at step {stopped_at},"
    with pytest.raises(TrainingStopped, match=rf"The training loss became nan at step 3; {stopped}"):
        pretrain(output, "--max_steps", "6", "--save_steps", "2", "--logging_steps", logging_steps,
                 "--per_device_train_batch_size", "8", "--do_eval", "False")  # fmt: skip
    assert not (output / "model.safetensors").exists()  # no final model from a broken run
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    weights = load_file(output / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_an_incompletely_saved_checkpoint_is_skipped_on_resume(tmp_path):
    output = tmp_path / "run"
    flags = [
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--do_eval",
        "False",
        "--max_train_samples",
        "64",
        "--save_total_limit",
        "5",
    ]
    pretrain(output, *flags)
    for path in output.iterdir():  # a run killed while writing checkpoint-4, after checkpoint-2
        if path.is_file():
            path.unlink()
    (output / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    (output / "checkpoint-2" / "trainer_state.json").write_text(
        (output / "checkpoint-2" / "trainer_state.json")
        .read_text()
        .replace('"log_history": [', '"log_history": [{"marker": 2}, ')
    )
    pretrain(output, *flags)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["log_history"][0] == {"marker": 2}


def test_code_in_a_checkpoint_never_runs(tmp_path, pretrained):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for path in pretrained.iterdir():
        if path.is_file():
            (checkpoint / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "code-ran"
    for code_file in ("modeling_selfie.py", "configuration_selfie.py"):
        (checkpoint / code_file).write_text(
            f"open({str(marker)!r}, 'w').write('ran')\n" + (checkpoint / code_file).read_text()
        )
    fine_tune(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not marker.exists()  # the scripts use this repository's code, never the checkpoint's


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_a_rerun_resumes_from_it(tmp_path, signum):
    output = tmp_path / "run"

    def command(max_steps: int) -> list[str]:
        return [
            sys.executable,
            str(REPOSITORY / "run_pretraining.py"),
            "--output_dir",
            str(output),
            "--do_train",
            "--max_steps",
            str(max_steps),
            "--save_steps",
            "1000",
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--max_train_samples",
            "64",
            *TINY_MODEL_FLAGS,
            "--report_to",
            "none",
            "--disable_tqdm",
            "True",
        ]

    process = subprocess.Popen(command(1000), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until training runs
        if "'loss'" in line:
            break
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signum, stderr[-2000:]
    assert f"Stopped by {signum.name} at step" in stderr and "run the same command again to resume" in stderr
    checkpoints = list(output.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (output / "model.safetensors").exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 1000

    resumed = subprocess.run(command(step + 2), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == step + 2


def test_an_empty_split_is_refused(tmp_path, image_folder):
    folder = tmp_path / "empty"
    folder.mkdir()
    features = Features({"img": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    Dataset.from_dict({"img": [], "label": []}, features=features).to_parquet(folder / "train.parquet")
    with pytest.raises(ValueError, match=r"^--dataset_name .*empty: Instruction \"train\" corresponds to no data!$"):
        pretrain(tmp_path / "run", "--dataset_name", str(folder), "--max_steps", "1")
    with pytest.raises(ValueError, match=r"^--validation_dir .*empty: Instruction \"train\" corresponds to no data!$"):
        pretrain(
            tmp_path / "run", "--train_dir", str(image_folder), "--validation_dir", str(folder), "--max_steps", "1"
        )
    with pytest.raises(ValueError, match=r"^The train split of the dataset is empty\.$"):
        pretrain(tmp_path / "run", "--train_dir", str(image_folder), "--max_train_samples", "0", "--max_steps", "1")
