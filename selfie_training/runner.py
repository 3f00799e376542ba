"""What both training scripts share: model arguments, argument parsing, logging, error reporting, checkpoint
detection, the config, the model, the image processor, and the train-evaluate-save sequence."""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from safetensors import SafetensorError
from transformers import AutoImageProcessor, HfArgumentParser, PreTrainedConfig, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_selfie import SelfieConfig, get_preset

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


def parse_arguments(dataclass_types: tuple, args: list[str] | None = None) -> tuple:
    """Command-line flags, or a single JSON file of them."""
    parser = HfArgumentParser(dataclass_types)
    args = sys.argv[1:] if args is None else args
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def setup(training_args: TrainingArguments):
    """Logging as the transformers examples set it up."""
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
    """A fresh `model_class` of `config`, or one holding the --model_name_or_path weights, read from safetensors
    alone (never from pickle files, which can run code)."""
    if model_args.model_name_or_path is None:
        return model_class(config)
    try:
        return model_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            use_safetensors=True,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    except (OSError, SafetensorError) as error:
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path}: no readable model.safetensors ({_first_line(error)})"
        ) from error


def _first_line(error: Exception) -> str:
    return str(error).strip().split("\n")[0]


def build_config(model_args: ModelArguments, preset_name: str, **fields) -> SelfieConfig:
    """The checkpoint's config (--config_name, --model_name_or_path) or the preset's, with `fields` and the
    --backbone, --backbone_kwargs and --config_overrides flags applied, validated as a whole."""
    flag = "--config_name" if model_args.config_name else "--model_name_or_path"
    source = model_args.config_name or model_args.model_name_or_path
    config = load_selfie_config(source, flag) if source else get_preset(preset_name).config()
    values = {**config.to_dict(), **fields}
    if model_args.backbone is not None:
        values["backbone"] = model_args.backbone
    if model_args.backbone_kwargs is not None:
        values["backbone_kwargs"] = json.loads(model_args.backbone_kwargs)
    if model_args.config_overrides is not None:
        config.update_from_string(model_args.config_overrides)
        values.update({name: getattr(config, name) for name in _override_names(model_args.config_overrides)})
    return SelfieConfig.from_dict(values)


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as file:
        json.dump(content, file, indent=2)
