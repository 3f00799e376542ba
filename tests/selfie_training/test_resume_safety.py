"""Rerunning a command into its --output_dir: one run at a time, a finished run left as it was, and checkpoints that
are another run's, damaged or unsafe skipped or refused in one line."""

import fcntl
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfie_training.checkpoints import LOCK_FILE
from selfie_training.trainer import PretrainingTrainer
from tests.utils import TINY_MODEL_FLAGS, fine_tune, last_checkpoint, pretrain


# 2 steps of the 8 in an epoch (64 images, 8 a batch): the run ends mid-epoch; checkpoint-1 and checkpoint-2.
FLAGS = [
    "--max_steps",
    "2",
    "--save_steps",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "16",
]
UNPICKLED = []


class Harmless:
    """What a pickle could hold: unpickling it would call __setstate__ (here only recorded), and could run code."""

    def __init__(self):
        self.payload = "harmless"

    def __setstate__(self, state):
        UNPICKLED.append(state)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished") / "run"
    pretrain(output, *FLAGS)
    return output


@pytest.fixture
def run(tmp_path, finished_run) -> Path:
    """A copy of the finished run, to change."""
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def global_step(state_file: Path) -> int:
    return json.loads(state_file.read_text())["global_step"]


# Another run's lock, as output_dir_lock takes it: an flock on the lock file, which holds the PID.
LOCK_HOLDER = """import fcntl, os, sys
file = open(sys.argv[1], "a+")
fcntl.flock(file, fcntl.LOCK_EX)
file.truncate(0)
file.write(f"{os.getpid()}\\n")
file.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_an_output_dir_in_use_is_refused(run, monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(ValueError, match=rf"^--output_dir {run} is in use by another run \(PID {holder.pid}\): wait"):
        pretrain(run, *FLAGS, "--max_steps", "3")
    holder.communicate("")  # the other run ends, and the kernel releases its lock
    assert global_step(run / "trainer_state.json") == 2 and not (run / "checkpoint-3").exists()

    # A run that fails before training releases the lock: the folder is free for the next run.
    with pytest.raises(ValueError, match=r"--image_column_name 'picture' is not a column"):
        pretrain(run, *FLAGS, "--max_steps", "3", "--image_column_name", "picture")
    with open(run / LOCK_FILE) as file:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held_while_training = []

    def training_step(self, *args, **kwargs):
        with open(run / LOCK_FILE) as file:  # another open file: it contends for the lock as another process would
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_while_training.append(False)
            except BlockingIOError:
                held_while_training.append(True)
        return original_training_step(self, *args, **kwargs)

    original_training_step = PretrainingTrainer.training_step
    monkeypatch.setattr(PretrainingTrainer, "training_step", training_step)
    pretrain(run, *FLAGS, "--max_steps", "3")
    assert held_while_training == [True] and global_step(run / "trainer_state.json") == 3
    with open(run / LOCK_FILE) as file:  # released at the end of the run
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("end", [[], ["--max_steps", "-1", "--num_train_epochs", "0.25"]], ids=["steps", "epochs"])
def test_rerunning_a_finished_run_trains_nothing_more(run, end, caplog):
    before = {name: (run / name).read_bytes() for name in ("trainer_state.json", "train_results.json")}
    weights = load_file(run / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        metrics = pretrain(run, *FLAGS, *end)  # the same command again, its end given as 2 steps or 1/4 epoch
    assert not (run / "checkpoint-3").exists()
    for name, tensor in load_file(run / "model.safetensors").items():
        assert torch.equal(tensor, weights[name]), name
    assert {name: (run / name).read_bytes() for name in before} == before  # global_step 2, the same train metrics
    assert "train_loss" not in metrics and "eval_loss" in metrics
    assert f"{run}/checkpoint-2 is at step 2 of this run's 2: the run had finished" in caplog.text


def test_a_checkpoint_of_another_model_is_refused(run):
    with pytest.raises(
        ValueError,
        match=rf"^{run}/checkpoint-2 is another run's checkpoint \(it holds a SelfieForMaskedPatchPrediction; this "
        r"run trains a SelfieForImageClassification\): give this run another --output_dir\.$",
    ):
        fine_tune(run, *TINY_MODEL_FLAGS, "--max_steps", "3")
    with pytest.raises(
        ValueError,
        match=rf"^{run}/checkpoint-2 is another run's checkpoint \(its tensor '[\w.]+' is "
        r"\([\d, ]+\), this run's \([\d, ]+\)\): give this run another --output_dir",
    ):
        pretrain(run, *FLAGS, "--config_overrides", "hidden_size=16,num_attention_heads=4,num_hidden_layers=1")
    assert global_step(run / "trainer_state.json") == 2 and not (run / "checkpoint-3").exists()


def test_a_checkpoint_with_truncated_weights_is_skipped_for_the_one_before(run, caplog):
    weights = run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    state_file = run / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].insert(0, {"marker": 1})
    state_file.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING):
        pretrain(run, *FLAGS, "--max_steps", "3")
    assert f"Skipping {run}/checkpoint-2: its model.safetensors cannot be read" in caplog.text
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["log_history"][0] == {"marker": 1}


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("trainer_state.json", b"[2]"),  # JSON, but not an object
        ("config.json", b'{"model_type": "sel'),
        ("model.safetensors", b""),
        ("optimizer.pt", b"PK\x03\x04"),
        ("rng_state.pth", b"not a torch file"),
        ("data_rng_state.pth", b""),
    ],
)
def test_a_checkpoint_with_a_damaged_file_is_skipped(run, name, damage, caplog):
    (run / "checkpoint-2" / name).write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(run) == str(run / "checkpoint-1")
    assert f"Skipping {run}/checkpoint-2: its {name} cannot be read (" in caplog.text
    (run / "checkpoint-1" / name).write_bytes(damage)
    assert last_checkpoint(run) is None  # none left to resume: training starts afresh
    with pytest.raises(ValueError, match=rf"^--resume_from_checkpoint {run}/checkpoint-1: its {name} cannot be read"):
        last_checkpoint(run, resume_from_checkpoint=str(run / "checkpoint-1"))


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt", "data_rng_state.pth"])
def test_a_pickle_in_a_checkpoint_is_refused_unread(run, name):
    path = run / "checkpoint-2" / name
    torch.save({"state": Harmless()}, path)
    message = rf"^{re.escape(str(path))}: not a plain tensor file \(refused: unpickling it could run code\)\.$"
    with pytest.raises(ValueError, match=message):
        pretrain(run, *FLAGS, "--max_steps", "3")
    with pytest.raises(ValueError, match=message):
        pretrain(run, *FLAGS, "--max_steps", "3", "--resume_from_checkpoint", str(run / "checkpoint-2"))
    assert not UNPICKLED
    assert global_step(run / "trainer_state.json") == 2 and not (run / "checkpoint-3").exists()


def test_an_optimizer_of_other_parameter_groups_is_named(run):
    with pytest.raises(
        ValueError,
        match=rf"^{run}/checkpoint-2/optimizer.pt does not fit this run's optimizer \("
        r"loaded state dict contains a parameter group .*--train_norm_only",
    ):
        pretrain(run, *FLAGS, "--max_steps", "3", "--train_norm_only")


def test_the_loss_scale_of_an_fp16_run_is_ignored_by_a_run_without_one(run, caplog):
    shutil.rmtree(run / "checkpoint-2")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), run / "checkpoint-1" / "scaler.pt")
    with caplog.at_level(logging.WARNING):
        pretrain(run, *FLAGS)
    assert f"Ignoring {run}/checkpoint-1/scaler.pt: this run scales no losses" in caplog.text
    assert global_step(run / "trainer_state.json") == 2
