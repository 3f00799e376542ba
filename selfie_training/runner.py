"""What both training scripts share: model arguments, argument parsing, logging, error reporting, checkpoint
detection, the config, the model, the image processor, and the train-evaluate-save sequence."""

import fcntl
import glob
import json
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoImageProcessor, HfArgumentParser, PreTrainedConfig, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_NAME, cached_file

from modeling_selfie import SelfieConfig, get_preset, load_timm_weights
from modeling_selfie.configuration_selfie import TIMM_WEIGHTS, _is_number, _is_positive_int
from modeling_selfie.modeling_selfie import create_resnet

from .trainer import StopOnSignal, TrainingStopped, stop_when_disk_full


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A Selfie checkpoint (local or on the Hub) to start from."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "A Selfie checkpoint or config whose architecture to build with fresh weights."},
    )
    backbone: str | None = field(
        default=None, metadata={"help": "A timm ResNet name, instead of the preset's resnet50."}
    )
    backbone_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON of timm.create_model arguments, e.g. '{\"channels\": [16, 32, 64, 128]}'."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "SelfieConfig fields to override, e.g. 'num_masked_patches=6,num_hidden_layers=2'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start weights afresh where the checkpoint's shapes differ (another num_labels)."},
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Keep the convolution weights in channels_last memory format: faster on GPUs under --bf16."},
    )
    backbone_weights: str | None = field(
        default=None,
        metadata={
            "help": "Start the ResNet (the patch network, and a classifier's stage 4) from timm weights: "
            f"'{TIMM_WEIGHTS}' for timm's pretrained weights of --backbone (downloaded from the Hub), or a timm "
            "checkpoint file (.safetensors, or a torch file read with weights_only=True). With the cifar stem, a stem "
            "convolution of another shape (ImageNet's 7x7) is not loaded: the 3x3 stem starts fresh."
        },
    )

    def __post_init__(self):
        if self.backbone_weights is not None and self.model_name_or_path is not None:
            raise ValueError(
                f"--backbone_weights {self.backbone_weights} and --model_name_or_path {self.model_name_or_path} both "
                "give the starting weights: give one."
            )


def parse_arguments(dataclass_types: tuple, args: list[str] | None = None) -> tuple:
    """Command-line flags, or a single JSON file of them."""
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else args
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def setup(training_args: TrainingArguments):
    """Logging as the transformers examples set it up, and an --output_dir that can be written."""
    check_output_dir(training_args.output_dir)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for library_logger in (logging.getLogger("selfie_training"), logging.getLogger("__main__")):
        library_logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # The datasets are transformed lazily into `pixel_values`: the Trainer must not drop their raw columns.
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False  # every Selfie model uses all of its parameters
    logger.info("Training arguments: %s", training_args)


def check_output_dir(output_dir: str):
    """Refuse, before any work, an --output_dir that is a file or cannot be written: otherwise the run would fail at
    its first save, its training lost."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder: give a folder to write the run into.")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ValueError(f"--output_dir {output_dir} cannot be written: {error.strerror or error}.") from error


def run(main):
    """Run a script's `main`. A user error (a bad flag, file, column or value) ends it with one line on stderr and
    exit status 2, a stopped training run (a signal, a non-finite loss) with its own line and status; the
    traceback is logged at debug level (`--log_level debug`)."""
    try:
        main()
    except (ValueError, TrainingStopped) as error:
        logger.debug("Traceback of the error below:", exc_info=True)
        print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(error.exit_status if isinstance(error, TrainingStopped) else 2)
    finally:
        end_process_group()


def end_process_group():
    """Destroy the process group of a multi-process run (`accelerate launch`) while the interpreter is whole. Left to
    interpreter exit, gloo's worker threads can still hold finished work whose tensors reference Python objects;
    freeing those during finalisation takes the GIL of a dying interpreter and aborts the process ("terminate called
    without an active exception", SIGABRT): a finished run that exits non-zero."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


LOCK_FILE = "_selfie.lock"  # push_to_hub leaves out names that start with "_"
_held_locks = {}  # the real path of each --output_dir that this process holds -> its open lock file


def find_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """Lock --output_dir for this run (`lock_output_dir`), then find the checkpoint to resume from:
    --resume_from_checkpoint, or the newest complete checkpoint in --output_dir, so that a rerun of an interrupted
    command resumes. A checkpoint is complete once its files read back (`_checkpoint_problem`); one that does not,
    saved in part by a killed run or damaged since, is skipped for the one before it."""
    lock_output_dir(training_args)
    if training_args.resume_from_checkpoint is not None:
        checkpoint = training_args.resume_from_checkpoint
        problem = _checkpoint_problem(checkpoint) if training_args.do_train else None
        if problem:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: {problem}.")
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
            raise ValueError(f"{path}: not a plain tensor file (refused: unpickling it could run code).") from error
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as error:
            return f"its {name} cannot be read ({_first_line(error) or type(error).__name__})"
    return None


def _read_checkpoint_file(path: str):
    """Read enough of `path` to know that resuming can read it, raising what the reading raises."""
    if path.endswith(".json"):
        with open(path) as file:
            values = json.load(file)
        if not isinstance(values, dict):
            raise ValueError(f"a JSON {type(values).__name__}, not an object")
    elif path.endswith(".safetensors"):
        with safe_open(path, "pt"):  # reads the header, and checks that the file holds every tensor it lists
            pass
    else:
        with safe_globals():  # the numpy types in Trainer's rng_state.pth
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the tensors are not read


def lock_output_dir(training_args: TrainingArguments):
    """Hold --output_dir for this run until `unlock_output_dir`: a second run into it would resume from this run's
    checkpoints and save its own under the same names. The lock is an flock on `_selfie.lock` in the folder, taken
    by the main process alone (the one that saves), so that the kernel releases it however the process ends: a
    killed run never leaves the folder locked. A second run is refused in one line naming the PID that holds it."""
    output_dir = os.path.realpath(training_args.output_dir)
    if training_args.process_index != 0:
        return  # the other processes of a multi-process run save nothing of their own
    if output_dir in _held_locks:
        return  # held already by this process: an earlier run in it (a test, a benchmark) stopped before unlocking
    file = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise ValueError(
            f"--output_dir {training_args.output_dir} is in use by another run (PID {holder}): wait for it to end, "
            "or give this run another --output_dir."
        ) from None
    file.truncate(0)
    file.write(f"{os.getpid()}\n")
    file.flush()
    _held_locks[output_dir] = file


def unlock_output_dir(training_args: TrainingArguments):
    file = _held_locks.pop(os.path.realpath(training_args.output_dir), None)
    if file is not None:
        file.close()  # which releases the lock


def load_selfie_config(source: str, flag: str) -> SelfieConfig:
    """The Selfie config of a checkpoint or config file, or a one-line error naming `flag` and `source`."""
    try:
        values, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as error:
        raise ValueError(f"{flag} {source}: no readable config.json ({_first_line(error)})") from error
    if not isinstance(values, dict):
        raise ValueError(
            f"{flag} {source}: its config.json holds a JSON {type(values).__name__}, not an object of fields."
        )
    if values.get("model_type") != SelfieConfig.model_type:
        raise ValueError(f"{flag} {source} holds a {values.get('model_type')!r} model, not a Selfie one.")
    try:
        return SelfieConfig.from_dict(values)
    except (TypeError, ValueError, AttributeError) as error:  # Selfie's fields raise ValueError, transformers' any
        raise ValueError(
            f"{flag} {source}: its config.json is not a valid Selfie config: {_first_line(error)}"
        ) from error


def build_model(model_class, model_args: ModelArguments, config: SelfieConfig):
    """A fresh `model_class` of `config` (its ResNet from --backbone_weights, where given), or one holding the
    --model_name_or_path weights, in the memory format --channels_last asks for."""
    model = _create_model(model_class, model_args, config)
    return model.to(memory_format=torch.channels_last) if model_args.channels_last else model


def _create_model(model_class, model_args: ModelArguments, config: SelfieConfig):
    if model_args.model_name_or_path is not None:
        return load_checkpoint(
            model_class,
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    try:
        model = model_class(config)
    except OSError as error:  # with --backbone_weights timm, `config.backbone_pretrained` downloads timm's weights
        raise ValueError(
            f"--backbone_weights {TIMM_WEIGHTS}: timm's {config.backbone} weights could not be fetched ({_first_line(error)})"
        ) from error
    if model_args.backbone_weights not in (None, TIMM_WEIGHTS):
        try:
            load_timm_weights(model, model_args.backbone_weights)
        except ValueError as error:
            raise ValueError(f"--backbone_weights {error}") from error
        logger.info("The ResNet starts from the timm weights in %s.", model_args.backbone_weights)
    return model


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
        raise ValueError(f"{source}: no readable model.safetensors ({_first_line(error)})") from error
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
        raise ValueError(
            f"{source}: tensor {key!r} has shape {saved} in the checkpoint but {built} in the model ({len(refused)} "
            f"differing tensors; changed by --backbone, --backbone_kwargs, --config_overrides or --classifier_head?): "
            f"{advice}."
        )
    missing = [key for key in model.state_dict() if key in patch_network and key in info["missing_keys"]]
    if missing:
        raise ValueError(
            f"{source}: its model.safetensors holds {len(patch_network) - len(missing)} of the {len(patch_network)} "
            f"tensors of the patch network ({missing[0]!r} is missing): are its tensor names another model's?"
        )


def _patch_network_keys(model) -> set[str]:
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    return {f"{prefix}patch_network.{name}" for name in model.base_model.patch_network.state_dict()}


def _check_finite(model, source: str):
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"{source}: tensor {name!r} holds NaN or infinite values (the weights of a diverged run?)."
            )


def _first_line(error: Exception) -> str:
    return str(error).strip().split("\n")[0]


def build_config(model_args: ModelArguments, preset_name: str, stage: dict | None = None, **fields) -> SelfieConfig:
    """The checkpoint's config (--config_name, --model_name_or_path) or the preset's, with `fields` and the
    --backbone, --backbone_kwargs, --backbone_weights and --config_overrides flags applied, validated as a whole.
    Its `training_stages` are those of the starting weights followed by `stage`, this run's training (None for a
    run that does not train)."""
    flag = "--config_name" if model_args.config_name else "--model_name_or_path"
    source = model_args.config_name or model_args.model_name_or_path
    config = load_selfie_config(source, flag) if source else get_preset(preset_name).config()
    values = {**config.to_dict(), **fields}
    # Only the flag downloads timm's weights, never a config copied with --config_name from a model that started so.
    values["backbone_pretrained"] = model_args.backbone_weights == TIMM_WEIGHTS
    values["training_stages"] = [*_starting_stages(model_args), *([stage] if stage else [])]
    if model_args.backbone is not None:
        values["backbone"] = model_args.backbone
    if model_args.backbone_kwargs is not None:
        values["backbone_kwargs"] = _json_object("--backbone_kwargs", model_args.backbone_kwargs)
    if model_args.config_overrides is not None:
        config.update_from_string(model_args.config_overrides)
        values.update({name: getattr(config, name) for name in _override_names(model_args.config_overrides)})
    config = SelfieConfig.from_dict(values)
    _check_backbone_builds(config)
    return config


def _json_object(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} {text!r} is not JSON ({error}).") from error
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {text!r} must be a JSON object of timm.create_model arguments.")
    return value


def _check_backbone_builds(config: SelfieConfig):
    """timm takes `backbone_kwargs` unchecked: build the ResNet on the meta device (no memory, no download), so that
    a value of the wrong type fails here in one line rather than deep in timm when the model is built."""
    if not config.backbone_kwargs:
        return
    try:
        with torch.device("meta"):
            create_resnet(config)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(
            f"SelfieConfig.backbone_kwargs={config.backbone_kwargs!r}: timm's {config.backbone} cannot be built with "
            f"them ({_first_line(error) or type(error).__name__})."
        ) from error


def _starting_stages(model_args: ModelArguments) -> list[dict]:
    """The training stages that the starting weights went through."""
    if model_args.backbone_weights is not None:
        return [{"task": "timm_weights", "weights": model_args.backbone_weights}]
    if model_args.model_name_or_path is not None:
        return load_selfie_config(model_args.model_name_or_path, "--model_name_or_path").training_stages
    return []  # fresh weights, even where --config_name copies the architecture of a trained model


def _override_names(overrides: str) -> list[str]:
    return [item.split("=", 1)[0].strip() for item in overrides.split(",") if item.strip()]


def load_image_processor(model_args: ModelArguments, preset_name: str, config: SelfieConfig):
    """The checkpoint's image processor, where it has one, else the preset's. The weights were trained with its
    sizes and normalisation, and `pipeline` runs its steps: a file that is not a valid BitImageProcessor is refused,
    never silently replaced by the preset's; so is one whose crops are not the size of `config`'s images."""
    source = model_args.config_name or model_args.model_name_or_path
    path = _image_processor_file(source) if source is not None else None
    if path is None:
        if source is not None:
            logger.info("%s has no image processor; using the %s preset's.", source, preset_name)
        processor, origin = get_preset(preset_name).image_processor(), f"the {preset_name} preset's image processor"
    else:
        _check_image_processor(path)
        processor, origin = AutoImageProcessor.from_pretrained(path), path
    crop = (processor.crop_size["height"], processor.crop_size["width"])
    if crop != config.image_height_width:
        raise ValueError(
            f"{origin} crops images to {crop[0]}x{crop[1]}, but the model takes {'x'.join(map(str, config.image_height_width))} images (changed "
            "image_size with --config_overrides, or chosen another --preset?): give the two the same size."
        )
    return processor


def _image_processor_file(source: str) -> str | None:
    """The checkpoint's preprocessor_config.json, or None where it has none (a --config_name file has none)."""
    if os.path.isfile(source):
        return None
    try:
        return cached_file(source, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False)
    except OSError:  # a Hub checkpoint that is not in the cache, offline
        return None


# What the training transforms and `pipeline` read from an image processor file, and what each field must be.
IMAGE_PROCESSOR_FIELDS = {
    "image_processor_type": (
        lambda value: value in ("BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast"),
        "must be a BitImageProcessor, whose steps the training transforms follow (resize the shortest edge, centre "
        "crop, normalise)",
    ),
    "crop_size": (
        lambda value: (
            isinstance(value, dict) and all(_is_positive_int(value.get(side)) for side in ("height", "width"))
        ),
        "must be {'height': int, 'width': int}",
    ),
    "size": (
        lambda value: isinstance(value, dict) and _is_positive_int(value.get("shortest_edge")),
        "must be {'shortest_edge': int}",
    ),
    "image_mean": (lambda value: _are_numbers(value, 3), "must be 3 numbers, one a channel"),
    "image_std": (
        lambda value: _are_numbers(value, 3) and min(value) > 0,
        "must be 3 positive numbers, one a channel",
    ),
}
IMAGE_PROCESSOR_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")  # the transforms do them all


def _check_image_processor(path: str):
    try:
        with open(path) as file:
            values = json.load(file)
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path} is not a readable JSON file ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not the fields of an image processor.")
    for name, (valid, requirement) in IMAGE_PROCESSOR_FIELDS.items():
        if not valid(values.get(name)):
            raise ValueError(
                f"{path}: {name}={values.get(name)!r} {requirement}; without the file, the preset's is used."
            )
    for step in IMAGE_PROCESSOR_STEPS:
        if values.get(step, True) is not True:
            raise ValueError(
                f"{path}: {step}={values[step]!r} must be true: the training transforms always do this step."
            )


def _are_numbers(value, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(map(_is_number, value))


def train_and_evaluate(trainer, training_args: TrainingArguments, image_processor, checkpoint: str | None) -> dict:
    """Train (resuming from `checkpoint`), save the model and its image processor, evaluate, save the metrics as
    JSON, and write the model card. Returns the metrics. Releases the --output_dir lock of `find_last_checkpoint`,
    however it ends, so that the next run (in this process or another) can take it."""
    try:
        with stop_when_disk_full(training_args.output_dir):
            return _train_and_evaluate(trainer, training_args, image_processor, checkpoint)
    finally:
        unlock_output_dir(training_args)


def _train_and_evaluate(trainer, training_args: TrainingArguments, image_processor, checkpoint: str | None) -> dict:
    metrics = {}
    if training_args.do_train:
        stop = StopOnSignal()
        trainer.add_callback(stop)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if stop.signal is not None:
            raise TrainingStopped(
                f"Stopped by {stop.signal.name} at step {trainer.state.global_step}, after saving a checkpoint in "
                f"{training_args.output_dir}; run the same command again to resume.",
                exit_status=128 + stop.signal.value,
            )
        trainer.save_model()
        if trainer.is_world_process_zero():
            image_processor.save_pretrained(training_args.output_dir)
        if result.metrics:  # none where the run had finished before: nothing trained, its own metrics stay
            trainer.log_metrics("train", result.metrics)
            trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def save_json(path: str, content: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(content, file, indent=2)


def save_labelled_subset(output_dir: str, label_seed: int, indices: list[int]):
    """`labelled_subset.json`: which training images were labelled, to compare runs or redo one."""
    save_json(os.path.join(output_dir, "labelled_subset.json"), {"label_seed": label_seed, "train_indices": indices})
