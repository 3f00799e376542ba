"""Inputs that ended in a traceback or a misleading line (issue 45): each is refused in one line that names the
flag, field, file or Hub id at fault, before any work starts, or said as it is."""

import json
import logging
import shutil

import datasets
import httpx2
import huggingface_hub
import pytest
from transformers import TrainingArguments

from modeling_selfie import SelfieConfig, SelfieForMaskedPatchPrediction
from selfie_training import hub, runner
from selfie_training.data import DataArguments, labelled_splits, load_splits
from selfie_training.errors import TrainingStopped, UserError
from selfie_training.runner import ModelArguments, build_config
from tests.utils import TINY_MODEL, TINY_MODEL_FLAGS, fine_tune, last_checkpoint, pretrain, tiny_config


def test_every_config_field_is_settable_with_config_overrides():
    # Fields of every kind, each away from the preset's value: None defaults, lists, a dict, floats, strings.
    target = tiny_config(
        score_temperature=2.0,
        image_size=[32, 48],
        out_features=["stage2", "stage3"],
        position_embedding_type="full",
        output_hidden_states=True,
    ).to_dict()
    overrides = ",".join(f"{name}={json.dumps(target[name])}" for name in SelfieConfig.__annotations__)
    config = build_config(ModelArguments(config_overrides=overrides), "imagenet224").to_dict()
    assert {name: config[name] for name in SelfieConfig.__annotations__} == {
        name: target[name] for name in SelfieConfig.__annotations__
    }

    # transformers' own form: strings unquoted, true/false words; and a None field set back to None.
    config = build_config(
        ModelArguments(config_overrides="score_temperature=1.5,query_type=mlp,output_hidden_states=yes"), "cifar10"
    )
    assert (config.score_temperature, config.query_type, config.output_hidden_states) == (1.5, "mlp", True)
    assert build_config(ModelArguments(config_overrides="score_temperature=none"), "cifar10").score_temperature is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("num_patches=4", r"^--config_overrides 'num_patches=4': 'num_patches' is not a field of SelfieConfig: "),
        ("hidden_size", r"^--config_overrides 'hidden_size': 'hidden_size' is not of the form name=value\.$"),
        ("score_temperature=-1", r"^SelfieConfig\.score_temperature=-1 must be a positive number"),
        ("image_size=[32,48", r"^SelfieConfig\.image_size='\[32,48' must be a positive int or \[height, width\]\.$"),
    ],
)
def test_bad_config_overrides_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(ModelArguments(config_overrides=overrides), "cifar10")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per_device_train_batch_size", "0"], r"^--per_device_train_batch_size 0 must be at least 1\.$"),
        (["--per_device_eval_batch_size", "-1"], r"^--per_device_eval_batch_size -1 must be at least 1\.$"),
        (["--gradient_accumulation_steps", "0"], r"^--gradient_accumulation_steps 0 must be at least 1\.$"),
        (["--eval_accumulation_steps", "0"], r"^--eval_accumulation_steps 0 must be at least 1\.$"),
        (["--dataloader_num_workers", "-1"], r"^--dataloader_num_workers -1 must be at least 0\.$"),
        (
            ["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "0"],
            r"^--dataloader_prefetch_factor 0 must be at least 1\.$",
        ),
        (["--learning_rate", "nan"], r"^--learning_rate nan must be at least 0\.$"),
        (["--weight_decay", "-0.1"], r"^--weight_decay -0\.1 must be at least 0\.$"),
        (["--adam_beta1", "1.5"], r"^--adam_beta1 1\.5 must be in \[0, 1\)\.$"),
        (["--adam_epsilon", "-1"], r"^--adam_epsilon -1\.0 must be at least 0\.$"),
        (["--label_smoothing_factor", "1"], r"^--label_smoothing_factor 1\.0 must be in \[0, 1\)\.$"),
        (["--max_grad_norm", "nan"], r"^--max_grad_norm nan must be at least 0\.$"),
        (["--logging_steps", "-1"], r"^--logging_steps -1\.0 must be more than 0\.$"),
        (["--save_strategy", "steps", "--save_steps", "0"], r"^--save_steps 0\.0 must be more than 0\.$"),
        (["--eval_strategy", "steps", "--eval_steps", "-1"], r"^--eval_steps -1\.0 must be more than 0\.$"),
        (["--seed", "-1"], r"^--seed -1 must be in \[0, 4294967296\)\.$"),
        (["--split_seed", "-1"], r"^--split_seed -1 must be in \[0, 4294967296\)\.$"),
        (["--data_seed", "-1"], r"^--data_seed -1 must be in \[0, 4294967296\)\.$"),
        (
            ["--streaming", "--max_steps", "-1"],
            r"^--streaming reads a dataset of unknown length, in which the Trainer cannot count epochs: give "
            r"--max_steps, the number of steps to train\.$",
        ),
    ],
)
def test_bad_training_flags_are_refused_before_anything_runs(tmp_path, flags, message):
    """Each of these passed TrainingArguments and ended in a traceback from torch or the Trainer once the data and
    the model were loaded (or, for --weight_decay, trained on with a negative decay)."""
    with pytest.raises(UserError, match=message):
        pretrain(tmp_path / "run", "--max_steps", "1", *flags)
    assert not (tmp_path / "run").exists()


def test_a_label_seed_numpy_cannot_take_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"^--label_seed -1 must be in \[0, 4294967296\)\.$"):
        fine_tune(tmp_path / "run", "--label_fraction", "0.5", "--label_seed", "-1", "--max_steps", "1")
    assert not (tmp_path / "run").exists()


# The Hub, offline or unreachable. No test reaches the network (tests/conftest.py): offline mode, or a refused
# connection, is simulated.


def refuse_connections(*args, **kwargs):
    raise httpx2.ConnectError("[Errno -2] Name or service not known")


def test_push_to_hub_offline_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    flags = ["--push_to_hub", "--hub_model_id", "someone/selfie", "--hub_token", "hf_test", "--max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        runner.run(lambda: pretrain(tmp_path / "run", *flags))
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            "error: --push_to_hub someone/selfie: the Hub cannot be reached (offline mode is on: HF_HUB_OFFLINE). Drop "
            f"--push_to_hub, and upload the run once it can be: `hf upload someone/selfie {tmp_path / 'run'}`."
        )
    )
    assert not (tmp_path / "run").exists()  # nothing written, no lock file

    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(UserError, match=r"^--push_to_hub run needs a Hub token with write access: log in with"):
        pretrain(tmp_path / "run", "--push_to_hub", "--max_steps", "1")


def test_a_push_that_the_hub_refuses_is_one_line_and_leaves_the_output_dir_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)  # reachable when the run starts
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse_connections)
    flags = ["--push_to_hub", "--hub_model_id", "someone/selfie", "--hub_token", "hf_test", "--max_steps", "1"]
    with pytest.raises(
        UserError,
        match=r"^--push_to_hub someone/selfie: the Hub refused or could not be reached \(\[Errno -2\] Name or "
        r"service not known\)\. .*run keeps what the run wrote: upload it once the Hub takes it: `hf upload "
        r"someone/selfie .*run`\.$",
    ):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, *flags)
    assert last_checkpoint(tmp_path / "run") is None  # the lock can be taken again: it was released


def test_a_hub_dataset_that_cannot_be_reached_fails_at_once_in_one_line(tmp_path, monkeypatch):
    requests = []

    def unreachable(*args, **kwargs):
        requests.append(args)
        refuse_connections()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, but every request fails
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(httpx2.Client, "send", unreachable)
    with pytest.raises(
        UserError,
        match=r"^--dataset_name someone/images is not in the local cache, and the Hub cannot be reached "
        r"\(\[Errno -2\] Name or service not known\)\.$",
    ):
        pretrain(tmp_path / "run", "--dataset_name", "someone/images", "--cache_dir", str(tmp_path / "cache"))
    # One request found the Hub unreachable; everything after it read the local cache, as offline mode does,
    # instead of retrying each request with growing waits (about half a minute) before the same end.
    assert len(requests) == 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_every_process_logs_its_rank_and_the_world_size(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="selfie_training.runner"):
        runner.setup(TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert (
        "Process rank: 0, world size: 1, device: cpu, n_gpu: 0, distributed training: False, 16-bits training: False"
        in caplog.messages
    )


def test_an_image_folder_of_one_class_says_so(tmp_path, image_folder):
    """datasets labels an image folder by its class subfolders only where there are two or more; with its split
    folders too (train/cat, test/cat) the one class is named."""
    for split in ("train", "test"):
        shutil.copytree(image_folder / "class_0", tmp_path / "data" / split / "cat")
    args = DataArguments(dataset_name=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"^--dataset_name .*data has one class folder \('cat'\), so its images have"):
        labelled_splits(load_splits(args), args)


ONE_LOGGED_STEP = [
    "--max_steps",
    "2",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--do_eval",
    "False",
]
STOPPED = r"; the checkpoints in .* are intact \(the run stopped at step 1, before saving the weights of any step from then on\)\. "


def test_a_loss_overflowed_by_its_weight_names_the_weight(tmp_path):
    overrides = f"{TINY_MODEL['config_overrides']},masking_strategy=split,image_contrastive_weight=1e39"
    message = (
        r"^The training loss became inf at step 1 \(patch_selection_loss \d\.\d+, image_contrastive_loss \d\.\d+\)"
        + STOPPED
        + r"Its terms were finite, so the config's image_contrastive_weight=1e\+39, which weighs the image "
        r"contrastive term, overflowed their sum: lower it \(--config_overrides\), then run again\.$"
    )
    with pytest.raises(TrainingStopped, match=message):
        pretrain(tmp_path / "run", "--config_overrides", overrides, *ONE_LOGGED_STEP)


def test_a_loss_not_finite_at_the_first_step_is_not_blamed_on_the_learning_rate(tmp_path, monkeypatch):
    forward = SelfieForMaskedPatchPrediction.forward

    def forward_to_nan(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(SelfieForMaskedPatchPrediction, "forward", forward_to_nan)
    message = (
        r"^The training loss became nan at step 1"
        + STOPPED
        + r"It was the first step, before any update, so not --learning_rate: check the data and the config's "
        r"fields \(--config_overrides\), then run again\.$"
    )
    with pytest.raises(TrainingStopped, match=message):
        pretrain(tmp_path / "run", *ONE_LOGGED_STEP)
