"""What both training scripts share: model arguments, argument parsing, logging, error reporting, checkpoint
detection, the config, the model, the image processor, and the train-evaluate-save sequence."""

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoImageProcessor, HfArgumentParser, PreTrainedConfig, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_selfie import SelfieConfig, get_preset, load_timm_weights
from modeling_selfie.configuration_selfie import TIMM_WEIGHTS

from .trainer import StopOnSignal, TrainingStopped


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
    backbone: str | None = field(default=None, metadata={"help": "A timm ResNet name, instead of the preset's resnet50."})
    backbone_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON of timm.create_model arguments, e.g. \'{"channels": [16, 32, 64, 128]}\'.'}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "SelfieConfig fields to override, e.g. 'num_masked_patches=6,num_hidden_layers=2'."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Start weights afresh where the checkpoint's shapes differ (another num_labels)."}
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


def find_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint, or the newest complete checkpoint in --output_dir: a rerun of an interrupted
    command resumes. A checkpoint is complete once its trainer_state.json, which Trainer writes last, reads back."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    for step, name in sorted(_checkpoints(training_args.output_dir), reverse=True):
        checkpoint = os.path.join(training_args.output_dir, name)
        try:
            with open(os.path.join(checkpoint, "trainer_state.json")) as file:
                json.load(file)
        except (OSError, json.JSONDecodeError):
            logger.warning("Skipping %s: it was not completely saved.", checkpoint)
            continue
        logger.info("Resuming from %s; give another --output_dir to train from scratch.", checkpoint)
        return checkpoint
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return [
        (int(name.removeprefix(prefix)), name)
        for name in os.listdir(output_dir)
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit()
    ]


def load_selfie_config(source: str, flag: str) -> SelfieConfig:
    """The Selfie config of a checkpoint or config file, or a one-line error naming `flag` and `source`."""
    try:
        values, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as error:
        raise ValueError(f"{flag} {source}: no readable config.json ({_first_line(error)})") from error
    if values.get("model_type") != SelfieConfig.model_type:
        raise ValueError(f"{flag} {source} holds a {values.get('model_type')!r} model, not a Selfie one.")
    return SelfieConfig.from_dict(values)


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


def load_checkpoint(model_class, path: str, flag: str = "--model_name_or_path", **kwargs):
    """`model_class.from_pretrained(path, **kwargs)`, read from safetensors alone (never from pickle files, which can
    run code), or a one-line error naming `flag` and `path`."""
    try:
        return model_class.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{flag} {path}: no readable model.safetensors ({_first_line(error)})") from error


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
        values["backbone_kwargs"] = json.loads(model_args.backbone_kwargs)
    if model_args.config_overrides is not None:
        config.update_from_string(model_args.config_overrides)
        values.update({name: getattr(config, name) for name in _override_names(model_args.config_overrides)})
    return SelfieConfig.from_dict(values)


def _starting_stages(model_args: ModelArguments) -> list[dict]:
    """The training stages that the starting weights went through."""
    if model_args.backbone_weights is not None:
        return [{"task": "timm_weights", "weights": model_args.backbone_weights}]
    if model_args.model_name_or_path is not None:
        return load_selfie_config(model_args.model_name_or_path, "--model_name_or_path").training_stages
    return []  # fresh weights, even where --config_name copies the architecture of a trained model


def _override_names(overrides: str) -> list[str]:
    return [item.split("=", 1)[0].strip() for item in overrides.split(",") if item.strip()]


def load_image_processor(model_args: ModelArguments, preset_name: str):
    """The checkpoint's image processor, where it has one, else the preset's."""
    source = model_args.config_name or model_args.model_name_or_path
    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(source)
        except OSError:
            logger.info("%s has no image processor; using the %s preset's.", source, preset_name)
    return get_preset(preset_name).image_processor()


def train_and_evaluate(trainer, training_args: TrainingArguments, image_processor, checkpoint: str | None) -> dict:
    """Train (resuming from `checkpoint`), save the model and its image processor, evaluate, save the metrics as
    JSON, and write the model card. Returns the metrics."""
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
