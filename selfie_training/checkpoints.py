"""Checkpoints of the Selfie scripts: the --output_dir lock that makes the folder this run's own, which checkpoint to
resume, and reading a checkpoint's config and weights with one-line errors for what does not fit."""

import fcntl
import glob
import json
import logging
import os
import pickle
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME, cached_file

from modeling_selfie import AUTO_CLASSES, SelfieConfig, SelfieModel
from modeling_selfie.configuration_selfie import describe_unknown_fields, unknown_fields

from .errors import UserError, first_line


logger = logging.getLogger(__name__)

LOCK_FILE = "_selfie.lock"  # push_to_hub leaves out names that start with "_"
TRAINING_STAGES_FILE = "training_stages.json"


def find_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint, or the newest complete checkpoint in --output_dir, so
    that a rerun of an interrupted command resumes. A checkpoint is complete once its files read back
    (`_checkpoint_problem`); one that does not, saved in part by a killed run or damaged since, is skipped for the one
    before it. Call it inside `output_dir_lock`, so that no other run saves checkpoints there meanwhile."""
    if training_args.resume_from_checkpoint is not None:
        checkpoint = training_args.resume_from_checkpoint
        problem = _checkpoint_problem(checkpoint) if training_args.do_train else None
        if problem:
            raise UserError(f"--resume_from_checkpoint {checkpoint}: {problem}.")
        return checkpoint
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    for _, name in sorted(_checkpoints(training_args.output_dir), reverse=True):
        checkpoint = os.path.join(training_args.output_dir, name)
        problem = _checkpoint_problem(checkpoint)
        if problem:
            logger.warning("Skipping %s: %s, as when a run is killed while saving it.", checkpoint, problem)
            continue
        # A warning, to be seen at the default log level: the run goes on from this checkpoint's weights.
        logger.warning("Resuming from %s; give another --output_dir to train from scratch.", checkpoint)
        return checkpoint
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return [
        (int(name.removeprefix(prefix)), name)
        for name in os.listdir(output_dir)
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit()
    ]


def _checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot be resumed: the first of its files that does not read back as resuming reads it
    (trainer_state.json first: Trainer writes it last), or None. A torch file that would need more than
    `weights_only=True` to load, a pickle that could run code, is refused in one line rather than skipped."""
    torch_files = sorted(glob.glob("*.pt", root_dir=checkpoint) + glob.glob("*.pth", root_dir=checkpoint))
    for name in (TRAINER_STATE_NAME, CONFIG_NAME, SAFE_WEIGHTS_NAME, *torch_files):
        path = os.path.join(checkpoint, name)
        try:
            _read_checkpoint_file(path)
        except pickle.UnpicklingError as error:
            raise UserError(f"{path}: not a plain tensor file (refused: unpickling it could run code).") from error
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as error:
            return f"its {name} cannot be read ({first_line(error)})"
    return None


def _read_checkpoint_file(path: str):
    """Read enough of `path` to know that resuming can read it, raising what the reading raises."""
    if path.endswith(".json"):
        with open(path) as file:
            values = json.load(file)
        if not isinstance(values, dict):
            raise UserError(f"a JSON {type(values).__name__}, not an object")
    elif path.endswith(".safetensors"):
        with safe_open(path, "pt"):  # reads the header, and checks that the file holds every tensor it lists
            pass
    else:
        with safe_globals():  # the numpy types in Trainer's rng_state.pth
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the tensors are not read


@contextmanager
def output_dir_lock(training_args: TrainingArguments):
    """Hold --output_dir for the run inside the block: a second run into it would resume from this run's checkpoints
    and save its own under the same names. The lock is an flock on `_selfie.lock` in the folder, taken by the main
    process alone (the one that saves) and released when the block ends, however it ends; the kernel releases it too
    if the process is killed, so a folder is never left locked. A second run is refused in one line naming the PID
    that holds it."""
    if training_args.process_index != 0:  # the other processes of a multi-process run save nothing of their own
        yield
        return
    file = open(os.path.join(training_args.output_dir, LOCK_FILE), "a+")
    try:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise UserError(
                f"--output_dir {training_args.output_dir} is in use by another run (PID {holder}): wait for it to "
                "end, or give this run another --output_dir."
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
    finally:
        file.close()  # which releases the lock


def load_selfie_config(source: str, flag: str, **hub_kwargs) -> SelfieConfig:
    """The Selfie config of a checkpoint or config file (of the Hub revision and with the token of `hub_kwargs`), or
    a one-line error naming `flag` and `source`."""
    try:
        values, _ = PreTrainedConfig.get_config_dict(source, **hub_kwargs)
    except OSError as error:
        raise UserError(f"{flag} {source}: no readable config.json ({first_line(error)})") from error
    if not isinstance(values, dict):
        raise UserError(
            f"{flag} {source}: its config.json holds a JSON {type(values).__name__}, not an object of fields."
        )
    if values.get("model_type") != SelfieConfig.model_type:
        raise UserError(f"{flag} {source} holds a {values.get('model_type')!r} model, not a Selfie one.")
    try:
        config = SelfieConfig.from_dict(values)
    except (TypeError, ValueError, AttributeError) as error:  # Selfie's fields raise ValueError, transformers' any
        raise UserError(
            f"{flag} {source}: its config.json is not a valid Selfie config: {first_line(error)}"
        ) from error
    unknown = unknown_fields(config)
    if unknown:  # a run would ignore them, then copy them into its own checkpoint
        raise UserError(
            f"{flag} {source}: its config.json has {describe_unknown_fields(unknown)}, which this version of Selfie "
            "does not read: correct or remove them (a newer version's fields need that version)."
        )
    return config


def load_training_stages(source: str, **hub_kwargs) -> list[dict]:
    """Where the weights of checkpoint `source` came from, oldest stage first: its `training_stages.json`, or, for a
    checkpoint written before that file, the `training_stages` field of its config.json. Each stage is a dict with a
    `"task"` (`"timm_weights"`, `"pretraining"` or `"classification"`) and fields of its own; stages of other tasks
    or with other fields, written by a later version, are kept as they are. No stages: fresh weights."""
    try:
        path = cached_file(source, TRAINING_STAGES_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    except OSError:  # a Hub checkpoint that is not in the cache, offline
        path = None
    if path is None:
        stages, path = PreTrainedConfig.get_config_dict(source, **hub_kwargs)[0].get("training_stages", []), source
    else:
        try:
            with open(path) as file:
                stages = json.load(file).get("training_stages")
        except (OSError, ValueError, AttributeError) as error:  # unreadable, not JSON, not an object
            raise UserError(f"{path} is not a readable JSON object of training stages ({error}).") from error
    # Only the shape that every version writes: a later version's stages must load in this one.
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise UserError(f"{path}: training_stages={stages!r} must be a list of dicts.")
    for index, stage in enumerate(stages):
        if not isinstance(stage.get("task"), str):
            raise UserError(f"{path}: training_stages[{index}]={stage!r} must name its 'task'.")
    return stages


def save_training_stages(output_dir: str, stages: list[dict]):
    """Write `stages` beside the weights in `output_dir`, so that the chain travels with them into later runs."""
    with open(os.path.join(output_dir, TRAINING_STAGES_FILE), "w") as file:
        json.dump({"training_stages": stages}, file, indent=2)


def load_checkpoint(
    model_class, path: str, flag: str = "--model_name_or_path", ignore_mismatched_sizes: bool = False, **kwargs
):
    """`model_class.from_pretrained(path, **kwargs)`, read from safetensors alone (never from pickle files, which can
    run code), or a one-line error naming `flag` and `path`: for weights that cannot be read, a patch network that
    does not load whole, other tensors of other shapes (unless `ignore_mismatched_sizes`: they start afresh), and
    NaN or infinite weights."""
    source = f"{flag} {path}"
    try:
        # Shapes that differ are loaded afresh here and judged in `_check_loading`, which names the tensor.
        model, info = model_class.from_pretrained(
            path, use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
    except (OSError, SafetensorError) as error:
        raise UserError(f"{source}: no readable model.safetensors ({first_line(error)})") from error
    _check_loading(model, info, source, ignore_mismatched_sizes)
    _check_finite(model, source)
    return model


def _check_loading(model, info: dict, source: str, ignore_mismatched_sizes: bool):
    """The patch network, which every Selfie checkpoint holds, must load whole and with its shapes: a file whose
    tensor names or shapes are another model's would otherwise leave it silently random. Other tensors may be
    missing or unused (a classifier started from pretraining has no stage 4 or classifier in its checkpoint, and
    leaves A unused); of another shape, they start afresh only with --ignore_mismatched_sizes."""
    patch_network = _patch_network_keys(model)
    shapes = {key: (tuple(saved), tuple(built)) for key, saved, built in info["mismatched_keys"]}
    refused = [
        key for key in model.state_dict() if key in shapes and (key in patch_network or not ignore_mismatched_sizes)
    ]
    if refused:
        key, (saved, built) = refused[0], shapes[refused[0]]
        advice = (
            "the patch network must keep the checkpoint's shapes"
            if key in patch_network
            else "add --ignore_mismatched_sizes to start such tensors afresh"
        )
        raise UserError(
            f"{source}: tensor {key!r} has shape {saved} in the checkpoint but {built} in the model ({len(refused)} "
            f"differing tensors; changed by --backbone, --backbone_kwargs, --config_overrides or --classifier_head?): "
            f"{advice}."
        )
    missing = [key for key in model.state_dict() if key in patch_network and key in info["missing_keys"]]
    if missing:
        raise UserError(
            f"{source}: its model.safetensors holds {len(patch_network) - len(missing)} of the {len(patch_network)} "
            f"tensors of the patch network ({missing[0]!r} is missing): are its tensor names another model's?"
        )


def _patch_network_keys(model) -> set[str]:
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    return {f"{prefix}patch_network.{name}" for name in model.base_model.patch_network.state_dict()}


def _check_finite(model, source: str):
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"{source}: tensor {name!r} holds NaN or infinite values (the weights of a diverged run?)."
            )


def saved_model_class(config: SelfieConfig) -> type:
    """The Selfie class that a checkpoint was saved from (the first of its config's `architectures`), so that all of
    its weights load, none missing and none unused; `SelfieModel` for a config that names none."""
    classes = {model_class.__name__: model_class for model_class, _ in AUTO_CLASSES}
    return next((classes[name] for name in config.architectures or [] if name in classes), SelfieModel)
