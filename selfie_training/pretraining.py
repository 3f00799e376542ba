"""Selfie pretraining with the transformers `Trainer`: the body of `run_pretraining.py`."""

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

from modeling_selfie import SelfieForMaskedPatchPrediction
from modeling_selfie.modeling_selfie import NORM_LAYER_TYPES

from .checkpoints import find_last_checkpoint, output_dir_lock
from .data import (
    DataArguments,
    choose_preset,
    find_image_column,
    image_transform,
    limit_samples,
    load_splits,
    with_image_transform,
)
from .errors import UserError
from .evaluation import BatchNormRecalibration, KNNMonitorArguments, build_knn_monitor
from .metrics import compute_candidate_accuracy, image_candidate_hits
from .model_card import describe_objective
from .resident_images import ImageSplits, image_pipeline
from .runner import (
    ModelArguments,
    build_config,
    build_model,
    check_preset_applies,
    check_there_is_work,
    load_image_processor,
    parse_arguments,
    setup,
    train_and_evaluate,
    training_stages,
)
from .trainer import PretrainingTrainer
from .visualization import FIGURE_IMAGES, PretextFigure


logger = logging.getLogger(__name__)


@dataclass
class PretrainingArguments:
    train_norm_only: bool = field(
        default=False,
        metadata={
            "help": "HPT's cheap stage: train only the patch network's norm layers (their scales and shifts, and "
            "BatchNorm's running statistics) on this data; every other weight stays frozen. Meant to adapt a "
            "--model_name_or_path checkpoint to new data."
        },
    )
    batchnorm_recalibration_samples: int | None = field(
        default=None,
        metadata={
            "help": "When training ends, re-estimate the patch network's BatchNorm statistics on this many whole "
            "training images (drawn with --split_seed; evaluation transform, one pass), so that the saved model "
            "carries the statistics of the whole images that classifiers and frozen-feature evaluations feed it, "
            "not those of the patches it was pretrained on. The final evaluation reads them too; checkpoints keep "
            "the patches'. Default: off."
        },
    )

    def __post_init__(self):
        if self.batchnorm_recalibration_samples is not None and self.batchnorm_recalibration_samples < 1:
            raise UserError(
                f"--batchnorm_recalibration_samples {self.batchnorm_recalibration_samples} must be at least 1."
            )


# The script's flags, as dataclasses (run_sweep.py checks a sweep's flags against them before running it).
ARGUMENTS = (ModelArguments, PretrainingArguments, DataArguments, KNNMonitorArguments, TrainingArguments)


def main(args: list[str] | None = None) -> dict:
    trainer, training_args, image_processor = build_trainer(args)
    with output_dir_lock(training_args):
        return train_and_evaluate(trainer, training_args, image_processor, find_last_checkpoint(training_args))


def build_trainer(args: list[str] | None = None) -> tuple:
    """Everything up to training: the trainer, the training arguments and the image processor (the benchmarks time
    this trainer's steps)."""
    model_args, pretraining_args, data_args, monitor_args, training_args = parse_arguments(ARGUMENTS, args)
    check_there_is_work(training_args)
    setup(training_args)
    # The masks ride in the batch as `bool_masked_pos`: naming them the labels makes the Trainer hand them to
    # the metrics, and compute the evaluation loss, as it does for labels.
    training_args.label_names = ["bool_masked_pos"]
    set_seed(training_args.seed)

    splits = load_splits(data_args, token=model_args.token)
    image_column = find_image_column(splits["train"], data_args.image_column_name)
    preset = choose_preset(data_args, splits["train"], image_column)
    stage = {"task": "pretraining", "dataset": data_args.source, "norm_only": pretraining_args.train_norm_only}
    recalibration_images = None
    if pretraining_args.batchnorm_recalibration_samples is not None:
        recalibration_images, stage["batchnorm_recalibration_samples"] = draw_images(
            splits["train"], pretraining_args.batchnorm_recalibration_samples, data_args.split_seed
        )
    config = build_config(model_args, preset)
    if config.masking_strategy != "random":
        # Another objective than Selfie's own, in words: it travels with the weights into every later card.
        stage["objective"] = describe_objective(config)
    if recalibration_images is not None and config.backbone_norm != "batchnorm":
        raise UserError(
            f"--batchnorm_recalibration_samples needs BatchNorm in the patch network, but its backbone_norm is "
            f"{config.backbone_norm!r}, which keeps no statistics of the data."
        )
    image_processor = load_image_processor(model_args, preset, config)
    check_preset_applies(data_args.preset, model_args, config, image_processor)
    model = build_model(SelfieForMaskedPatchPrediction, model_args, config)
    if pretraining_args.train_norm_only:
        if model_args.model_name_or_path is None:
            logger.warning(
                "--train_norm_only without --model_name_or_path: the attention pooling network and the position "
                "embeddings stay as initialised."
            )
        train_norm_layers_only(model)

    eval_transform = image_transform(image_processor, train=False)
    image_splits = ImageSplits(
        splits["train"],
        splits["validation"],
        image_column,
        image_processor,
        patch_grid=config.grid_size,
        mask_sizes=(config.num_patches, config.num_masked_patches),
    )
    pipeline = image_pipeline(image_splits, data_args, training_args)
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        **pipeline,
        compute_metrics=compute_candidate_accuracy,
        preprocess_logits_for_metrics=image_candidate_hits,
        max_unreadable_fraction=data_args.max_unreadable_fraction,
        training_stages=training_stages(model_args, stage if training_args.do_train else None),
        pretext_figure=PretextFigure(
            with_image_transform(
                limit_samples(splits["validation"], FIGURE_IMAGES, data_args.split_seed), eval_transform, image_column
            ),
            image_processor,
            seed=data_args.split_seed,
            source=describe_figure_images(data_args),
        ),
        card={
            "task": "pretraining",
            "dataset": data_args.source,
            "evaluation_split": data_args.evaluation_split,
            "model_name_or_path": model_args.model_name_or_path,  # the card's base_model, if a Hub id
            "dataset_description": f"Images of {data_args.source}, labels unused. Objective: {describe_objective(config)}.",
        },
    )
    if monitor_args.knn_monitor_samples is not None:
        trainer.add_callback(build_knn_monitor(trainer, splits, data_args, image_processor, monitor_args))
    if recalibration_images is not None:
        trainer.add_callback(
            BatchNormRecalibration(
                with_image_transform(recalibration_images, eval_transform, image_column),
                batch_size=training_args.per_device_eval_batch_size,
                num_workers=training_args.dataloader_num_workers,
            )
        )
    return trainer, training_args, image_processor


def describe_figure_images(data_args: DataArguments) -> str:
    """The images of the pretext task's figure, validation images (`load_splits`), in words."""
    if data_args.evaluation_split == "train":  # the dataset has no validation split: they are held out from train
        return f"images held out from the training split of {data_args.source} (not trained on)"
    return f"images of the {data_args.evaluation_split} split of {data_args.source}"


def draw_images(dataset, samples: int, seed: int) -> tuple:
    """`samples` images of `dataset`, drawn with `seed`, and how many they are: fewer where the dataset is smaller, the
    number asked for where it is a stream (which has no length)."""
    images = limit_samples(dataset, samples, seed)
    return images, len(images) if hasattr(images, "__len__") else samples


def train_norm_layers_only(model: SelfieForMaskedPatchPrediction):
    """Freeze every parameter but those of the patch network's norm layers. Only P's norms: they carry the statistics
    of the data that HPT's cheap stage adapts, and P is what classifiers take over; A's LayerNorms normalise each
    token on its own (no data statistics) and belong to the pretraining head, which could otherwise absorb the
    change. Frozen parameters get no gradient, so the Trainer's optimizer skips them and DDP leaves them out."""
    model.requires_grad_(False)
    for module in model.selfie.patch_network.modules():
        if isinstance(module, NORM_LAYER_TYPES):
            module.requires_grad_(True)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        "--train_norm_only: training %s of %s parameters (the patch network's norm layers).",
        f"{trainable:,}",
        f"{total:,}",
    )
