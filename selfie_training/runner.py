"""What the training scripts share: model arguments, argument parsing, logging, error reporting, the config, the
model, the image processor, and the train-evaluate-save sequence."""

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import AutoImageProcessor, HfArgumentParser, TrainingArguments
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

from modeling_selfie import SelfieConfig, preset_image_processor
from modeling_selfie.configuration_selfie import is_number, is_positive_int
from modeling_selfie.modeling_selfie import create_resnet

from .checkpoints import load_checkpoint, load_selfie_config, load_training_stages
from .data import SEED_RANGE, DataArguments, crop_size
from .errors import TrainingStopped, UserError, first_line
from .hub import check_hub, is_hub_id, unreachable_reason
from .timm_weights import TIMM_WEIGHTS, load_timm_weights
from .trainer import StopOnSignal, stop_when_disk_full


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
        metadata={
            "help": "SelfieConfig fields to override, any of them, e.g. 'num_masked_patches=6,score_temperature=1.0,"
            "image_size=[32,48]': each value read as JSON (numbers, true/false, null, lists, objects) or a string."
        },
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

    # As in the transformers examples (run_mae.py, run_image_classification.py).
    image_processor_name: str | None = field(
        default=None,
        metadata={
            "help": "An image processor (a preprocessor_config.json, or the checkpoint or Hub repository holding "
            "one) instead of the checkpoint's or the preset's."
        },
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The revision of the Hub checkpoint to use: a branch name, a tag name or a commit id."},
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "The token for the Hub's private or gated checkpoints and datasets. Default: the one stored by "
            "`hf auth login`."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Never needed: the scripts build this repository's Selfie classes and never run code from a "
            "checkpoint or dataset. Only the Auto classes need it, outside the scripts."
        },
    )

    def __post_init__(self):
        if self.backbone_weights is not None and self.model_name_or_path is not None:
            raise UserError(
                f"--backbone_weights {self.backbone_weights} and --model_name_or_path {self.model_name_or_path} both "
                "give the starting weights: give one."
            )
        if self.trust_remote_code:
            raise UserError(
                "--trust_remote_code: the scripts build this repository's Selfie classes and never run code from a "
                "checkpoint or dataset, so there is none to trust: drop the flag."
            )
        sources = (self.model_name_or_path, self.config_name, self.image_processor_name)
        if self.model_revision != "main" and not any(map(is_hub_id, sources)):
            raise UserError(
                f"--model_revision {self.model_revision} picks a revision of a Hub checkpoint, but no Hub id is given "
                "(--model_name_or_path, --config_name, --image_processor_name are local or absent): drop it."
            )

    @property
    def hub_kwargs(self) -> dict:
        """What a read from the Hub takes: the revision and the token."""
        return {"revision": self.model_revision, "token": self.token}


def parse_arguments(dataclass_types: tuple, args: list[str] | None = None) -> tuple:
    """Command-line flags, or a single JSON file of them."""
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else args
    try:
        if len(args) == 1 and args[0].endswith(".json"):
            parsed = parser.parse_json_file(json_file=os.path.abspath(args[0]))
        else:
            parsed = parser.parse_args_into_dataclasses(args=args)
    except UserError:
        raise
    except ValueError as error:  # transformers' checks of its own flags (`TrainingArguments`), unknown JSON keys
        raise UserError(first_line(error)) from error
    training_args = next((arguments for arguments in parsed if isinstance(arguments, TrainingArguments)), None)
    if training_args is not None:
        data_args = next((arguments for arguments in parsed if isinstance(arguments, DataArguments)), None)
        check_training_arguments(training_args, data_args)
    check_hub(parsed)
    return parsed


def _at_least(low) -> tuple:
    return lambda value: value >= low, f"must be at least {low}"  # NaN fails every comparison


def _in_range(low, high) -> tuple:
    return lambda value: low <= value < high, f"must be in [{low}, {high})"


SEEDS = _in_range(*SEED_RANGE)
# The TrainingArguments fields that transformers takes unchecked and torch refuses only at the first step (after the
# data and the model are loaded), or takes silently (a negative --save_steps saves no checkpoint): what each must be.
TRAINING_ARGUMENT_RANGES = {
    "per_device_train_batch_size": _at_least(1),
    "per_device_eval_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "eval_accumulation_steps": _at_least(1),
    "dataloader_num_workers": _at_least(0),
    "dataloader_prefetch_factor": _at_least(1),
    "learning_rate": _at_least(0),
    "weight_decay": _at_least(0),
    "adam_beta1": _in_range(0, 1),
    "adam_beta2": _in_range(0, 1),
    "adam_epsilon": _at_least(0),
    "max_grad_norm": _at_least(0),  # 0: no clipping
    "label_smoothing_factor": _in_range(0, 1),
    # A step count, or below 1 a share of the training steps.
    "logging_steps": (lambda value: value > 0, "must be more than 0"),
    "save_steps": (lambda value: value > 0, "must be more than 0"),
    "eval_steps": (lambda value: value > 0, "must be more than 0"),
    "seed": SEEDS,
    "data_seed": SEEDS,
}


def check_training_arguments(training_args: TrainingArguments, data_args: DataArguments | None = None):
    """What TrainingArguments lets through and torch or the Trainer refuses at the first step, refused at the
    start: values out of range, and flags that do not go together."""
    for name, (valid, requirement) in TRAINING_ARGUMENT_RANGES.items():
        value = getattr(training_args, name)
        if value is not None and not valid(value):  # None: off, or the library's default
            raise UserError(f"--{name} {value} {requirement}.")
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers == 0:
        raise UserError(
            "--dataloader_persistent_workers keeps the DataLoader's workers between epochs, and "
            "--dataloader_num_workers 0 starts none: give workers, or drop --dataloader_persistent_workers."
        )
    if data_args is not None and data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UserError(
            "--streaming reads a dataset of unknown length, in which the Trainer cannot count epochs: give "
            "--max_steps, the number of steps to train."
        )


def check_there_is_work(training_args: TrainingArguments):
    """Refuse a training script's run with neither --do_train nor --do_eval, which (as in the transformers examples)
    would load the data and the model, do nothing with them, and write a model card over the one in --output_dir."""
    if not (training_args.do_train or training_args.do_eval):
        raise UserError("Neither --do_train nor --do_eval is given, so the run would do nothing: give either or both.")
    if training_args.do_train and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        # Trainer would run no step, then save the starting weights and a card as if they were trained.
        raise UserError(
            f"--num_train_epochs {training_args.num_train_epochs:g} trains no step: give epochs or --max_steps, or "
            "drop --do_train to evaluate the model as it is."
        )


def setup(training_args: TrainingArguments):
    """Logging as the transformers examples set it up, and an --output_dir that can be written."""
    check_output_dir(training_args.output_dir)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # As the transformers examples do: --log_level's default ("passive") then means info on the main process.
        transformers.utils.logging.set_verbosity_info()
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
    # As the transformers examples log it, on every process, with the world size: an `accelerate launch` that
    # started fewer processes than meant shows it here.
    logger.warning(
        f"Process rank: {training_args.process_index}, world size: {training_args.world_size}, device: "
        f"{training_args.device}, n_gpu: {training_args.n_gpu}, distributed training: "
        f"{training_args.parallel_mode.value == 'distributed'}, 16-bits training: "
        f"{training_args.fp16 or training_args.bf16}"
    )
    logger.info("Training arguments: %s", training_args)


def check_output_dir(output_dir: str):
    """Refuse, before any work, an --output_dir that is a file or cannot be written: otherwise the run would fail at
    its first save, its training lost."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder: give a folder to write the run into.")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise UserError(f"--output_dir {output_dir} cannot be written: {error.strerror or error}.") from error


def int_at_least(minimum: int):
    """An argparse `type` for the benchmarks' flags: an int of at least `minimum`, refused otherwise in argparse's one
    line (exit status 2) before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def run(main):
    """Run a script's `main`. A user error (a bad flag, file, column or value) ends it with one line on stderr and
    exit status 2, a stopped training run (a signal, a non-finite loss) with its own line and status; the
    traceback is logged at debug level (`--log_level debug`)."""
    try:
        main()
        wait_for_other_processes()
    except (UserError, TrainingStopped) as error:
        logger.debug("Traceback of the error below:", exc_info=True)
        print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(error.exit_status if isinstance(error, TrainingStopped) else 2)
    finally:
        end_process_group()


def wait_for_other_processes():
    """In a multi-process run (`accelerate launch`), return once every process has finished its work. The main
    process works on after the others (it writes the model card and the results, and alone computes the k-NN
    monitor's figures); a process that tore its process group down and exited meanwhile could abort in gloo's
    teardown ("terminate called without an active exception", SIGABRT): a finished run that exits non-zero."""
    if _in_process_group():
        torch.distributed.barrier()


def end_process_group():
    """Destroy the process group of a multi-process run while the interpreter is whole: left to interpreter exit,
    gloo's worker threads can still hold finished work whose tensors reference Python objects, and freeing them
    during finalisation aborts the process as above."""
    if _in_process_group():
        torch.distributed.destroy_process_group()


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
            **model_args.hub_kwargs,
        )
    model = model_class(config)
    if model_args.backbone_weights is not None:
        try:
            load_timm_weights(model, model_args.backbone_weights)
        except UserError as error:  # a file's errors start with its path; timm's own weights are named by the flag
            flag = (
                f"--backbone_weights {TIMM_WEIGHTS}:"
                if model_args.backbone_weights == TIMM_WEIGHTS
                else "--backbone_weights"
            )
            raise UserError(f"{flag} {error}") from error
        logger.info("The ResNet starts from %s.", _describe_timm_weights(model_args.backbone_weights, config))
    return model


def _describe_timm_weights(weights: str, config: SelfieConfig) -> str:
    return f"timm's {config.backbone} weights" if weights == TIMM_WEIGHTS else f"the timm weights in {weights}"


def build_config(model_args: ModelArguments, preset_name: str, **fields) -> SelfieConfig:
    """The checkpoint's config (--config_name, --model_name_or_path) or the preset's, with `fields` and the
    --backbone, --backbone_kwargs and --config_overrides flags applied, validated as a whole."""
    flag = "--config_name" if model_args.config_name else "--model_name_or_path"
    source = model_args.config_name or model_args.model_name_or_path
    config = (
        load_selfie_config(source, flag, **model_args.hub_kwargs) if source else SelfieConfig.from_preset(preset_name)
    )
    values = {**config.to_dict(), **fields}
    if model_args.backbone is not None:
        values["backbone"] = model_args.backbone
    if model_args.backbone_kwargs is not None:
        values["backbone_kwargs"] = _json_object("--backbone_kwargs", model_args.backbone_kwargs)
    if model_args.config_overrides is not None:
        overrides = parse_config_overrides(model_args.config_overrides, values)
        values.update(overrides)
        if "masking_strategy" in overrides and "num_masked_patches" not in overrides:
            values["num_masked_patches"] = None  # the new strategy's own default (half the grid for "split")
    try:
        config = SelfieConfig.from_dict(values)
    except ValueError as error:  # the config's checks name the field and value
        raise UserError(first_line(error)) from error
    _check_backbone_builds(config)
    return config


def _json_object(flag: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} {text!r} is not JSON ({error}).") from error
    if not isinstance(value, dict):
        raise UserError(f"{flag} {text!r} must be a JSON object of timm.create_model arguments.")
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
        raise UserError(
            f"SelfieConfig.backbone_kwargs={config.backbone_kwargs!r}: timm's {config.backbone} cannot be built with "
            f"them ({first_line(error)})."
        ) from error


def training_stages(model_args: ModelArguments, stage: dict | None) -> list[dict]:
    """Where the run's weights come from: the training stages that the starting weights went through, followed by
    `stage`, this run's training (None for a run that does not train)."""
    if model_args.backbone_weights is not None:
        starting = [{"task": "timm_weights", "weights": model_args.backbone_weights}]
    elif model_args.model_name_or_path is not None:
        starting = load_training_stages(model_args.model_name_or_path, **model_args.hub_kwargs)
    else:
        starting = []  # fresh weights, even where --config_name copies the architecture of a trained model
    return [*starting, *([stage] if stage else [])]


# The words for true and false that transformers' `PreTrainedConfig.update_from_string` reads for a bool field.
BOOLEAN_WORDS = {"true": True, "1": True, "y": True, "yes": True, "false": False, "0": False, "n": False, "no": False}


def parse_config_overrides(overrides: str, fields: dict) -> dict:
    """--config_overrides 'name=value,...' as `{name: value}`, for the config whose fields are `fields`. Every field
    can be set, whatever its type or default (`update_from_string` sets only those whose value is a bool, number or
    string): a value is read as JSON (numbers, true/false, null, lists such as image_size=[32,48], objects), else
    taken as the string it is; `none` is None too, and a bool field takes transformers' yes/no words."""
    parsed = {}
    for item in _top_level_items(overrides):
        name, equals, text = (part.strip() for part in item.partition("="))
        if not equals or not name:
            raise UserError(f"--config_overrides {overrides!r}: {item!r} is not of the form name=value.")
        if name not in fields:
            raise UserError(
                f"--config_overrides {overrides!r}: {name!r} is not a field of SelfieConfig: its own are "
                f"{', '.join(SelfieConfig.__annotations__)}, beside transformers' (output_hidden_states, ...)."
            )
        parsed[name] = _override_value(text, fields[name])
    return parsed


def _top_level_items(overrides: str) -> list[str]:
    """The comma-separated items of `overrides`, keeping the commas inside brackets and braces (a list's, a JSON
    object's) within their item."""
    items, start, depth = [], 0, 0
    for index, character in enumerate(overrides):
        depth += (character in "[{") - (character in "]}")
        if character == "," and depth == 0:
            items.append(overrides[start:index])
            start = index + 1
    items.append(overrides[start:])
    return [item for item in items if item.strip()]


def _override_value(text: str, current):
    if isinstance(current, bool) and text.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[text.lower()]
    if text.lower() == "none":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_image_processor(model_args: ModelArguments, preset_name: str, config: SelfieConfig):
    """--image_processor_name's image processor, else the checkpoint's where it has one, else the preset's. The
    weights were trained with its sizes and normalisation, and `pipeline` runs its steps: a file that is not a valid
    BitImageProcessor is refused, never silently replaced by the preset's; so is one whose crops are not the size of
    `config`'s images."""
    source = model_args.image_processor_name or model_args.config_name or model_args.model_name_or_path
    path = _image_processor_file(model_args)
    if path is None:
        if source is not None:
            logger.info("%s has no image processor; using the %s preset's.", source, preset_name)
        processor, origin = preset_image_processor(preset_name), f"the {preset_name} preset's image processor"
    else:
        _check_image_processor(path)
        processor, origin = AutoImageProcessor.from_pretrained(path), path
    crop = crop_size(processor)
    if crop != config.image_height_width:
        raise UserError(
            f"{origin} crops images to {crop[0]}x{crop[1]}, but the model takes {'x'.join(map(str, config.image_height_width))} images (changed "
            "image_size with --config_overrides, or chosen another --preset?): give the two the same size."
        )
    return processor


def check_preset_applies(preset: str | None, model_args: ModelArguments, config: SelfieConfig, image_processor):
    """--preset sets a fresh model's architecture and image processor; a checkpoint or config (--model_name_or_path,
    --config_name) brings its own, and a --preset that differs from them would do nothing: refused."""
    source = model_args.config_name or model_args.model_name_or_path
    if preset is None or source is None:
        return
    used = _described_settings(config, image_processor)
    asked = _described_settings(SelfieConfig.from_preset(preset), preset_image_processor(preset))
    differences = [f"{name} {used[name]}, the preset's {asked[name]}" for name in used if used[name] != asked[name]]
    if differences:
        raise UserError(
            f"--preset {preset} does nothing here: {source} brings its own architecture and image processor "
            f"({'; '.join(differences)}). Drop --preset; --config_overrides changes the architecture."
        )


def _described_settings(config: SelfieConfig, image_processor) -> dict[str, str]:
    """What a preset sets, in words."""
    return {
        "image size": "x".join(map(str, config.image_height_width)),
        "patch size": str(config.patch_size),
        "stem": config.stem,
        "resized shortest edge": str(image_processor.size["shortest_edge"]),
        "normalisation": f"mean {list(image_processor.image_mean)}, std {list(image_processor.image_std)}",
    }


def _image_processor_file(model_args: ModelArguments) -> str | None:
    """The preprocessor_config.json to read: --image_processor_name's (the file itself, or the one of its folder or
    Hub repository; refused where there is none), else the checkpoint's, or None where it has none (a --config_name
    file has none)."""
    named = model_args.image_processor_name
    if named is not None and os.path.isfile(named):
        return named
    source = named or model_args.config_name or model_args.model_name_or_path
    if source is None or os.path.isfile(source):
        return None
    try:
        path = cached_file(
            source, IMAGE_PROCESSOR_NAME, _raise_exceptions_for_missing_entries=False, **model_args.hub_kwargs
        )
    except OSError as error:  # a Hub checkpoint that is not in the cache, offline
        if named is not None:
            raise UserError(f"--image_processor_name {named}: {first_line(error)}") from error
        return None
    if path is None and named is not None:
        reason = unreachable_reason() if is_hub_id(named) else None  # offline, cached_file finds no file either
        if reason is not None:
            raise UserError(
                f"--image_processor_name {named} is not in the local cache, and the Hub cannot be reached ({reason})."
            )
        raise UserError(f"--image_processor_name {named} holds no {IMAGE_PROCESSOR_NAME}.")
    return path


# What the training transforms and `pipeline` read from an image processor file, and what each field must be.
IMAGE_PROCESSOR_FIELDS = {
    "image_processor_type": (
        lambda value: value in ("BitImageProcessor", "BitImageProcessorPil", "BitImageProcessorFast"),
        "must be a BitImageProcessor, whose steps the training transforms follow (resize the shortest edge, centre "
        "crop, normalise)",
    ),
    "crop_size": (
        lambda value: (
            isinstance(value, dict) and all(is_positive_int(value.get(side)) for side in ("height", "width"))
        ),
        "must be {'height': int, 'width': int}",
    ),
    "size": (
        lambda value: isinstance(value, dict) and is_positive_int(value.get("shortest_edge")),
        "must be {'shortest_edge': int}",
    ),
    "image_mean": (lambda value: _are_numbers(value, 3), "must be 3 numbers, one per channel"),
    "image_std": (
        lambda value: _are_numbers(value, 3) and min(value) > 0,
        "must be 3 positive numbers, one per channel",
    ),
}
IMAGE_PROCESSOR_STEPS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")  # the transforms do them all


def _check_image_processor(path: str):
    try:
        with open(path) as file:
            values = json.load(file)
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path} is not a readable JSON file ({error}).") from error
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a JSON {type(values).__name__}, not the fields of an image processor.")
    for name, (valid, requirement) in IMAGE_PROCESSOR_FIELDS.items():
        if not valid(values.get(name)):
            raise UserError(
                f"{path}: {name}={values.get(name)!r} {requirement}; without the file, the preset's is used."
            )
    for step in IMAGE_PROCESSOR_STEPS:
        if values.get(step, True) is not True:
            raise UserError(
                f"{path}: {step}={values[step]!r} must be true: the training transforms always do this step."
            )


def _are_numbers(value, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(map(is_number, value))


def train_and_evaluate(trainer, training_args: TrainingArguments, image_processor, checkpoint: str | None) -> dict:
    """Train (resuming from `checkpoint`), save the model and its image processor, evaluate, save the metrics as
    JSON, and write the model card (a run that does not train keeps a card already in --output_dir). Returns the
    metrics."""
    with stop_when_disk_full(training_args.output_dir):
        return _train_and_evaluate(trainer, training_args, image_processor, checkpoint)


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
    card = os.path.join(training_args.output_dir, "README.md")
    if training_args.do_train or not os.path.exists(card):
        trainer.create_model_card()
    else:  # an evaluation of a trained model in its own folder: its card keeps the training that made it
        logger.info("Kept the model card %s: a run that does not train writes none over one.", card)
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
