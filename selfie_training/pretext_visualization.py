"""The body of `run_visualization.py`: Selfie's pretext task as a pretraining checkpoint does it, drawn image by
image (`visualization.draw_pretext_tasks`)."""

import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from modeling_selfie import SelfieForMaskedPatchPrediction

from .checkpoints import saved_model_class
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
from .runner import ModelArguments, build_config, build_model, load_image_processor, parse_arguments, setup
from .visualization import FIGURE_IMAGES, do_pretext_task, draw_masks, read_images, write_pretext_figure


logger = logging.getLogger(__name__)


@dataclass
class VisualizationArguments:
    num_images: int = field(
        default=FIGURE_IMAGES,
        metadata={
            "help": "Draw the task on this many validation images, drawn with --split_seed as their masks are: one "
            "figure an image, pretext_task_<i>.png in --output_dir. The default draws the images and masks of the "
            "figure that run_pretraining.py puts into the model card (given the same data flags)."
        },
    )

    def __post_init__(self):
        if self.num_images < 1:
            raise UserError(f"--num_images {self.num_images} must be at least 1.")


def main(args: list[str] | None = None) -> list[str]:
    """Draw the figures; returns their paths."""
    model_args, visualization_args, data_args, training_args = parse_arguments(
        (ModelArguments, VisualizationArguments, DataArguments, TrainingArguments), args
    )
    setup(training_args)
    if model_args.model_name_or_path is None:
        raise UserError("Give --model_name_or_path: the pretraining checkpoint whose pretext task to draw.")
    splits = load_splits(data_args, token=model_args.token)
    image_column = find_image_column(splits["train"], data_args.image_column_name)
    preset = choose_preset(data_args, splits["train"], image_column)
    config = build_config(model_args, preset)
    saved_class = saved_model_class(config)
    if saved_class is not SelfieForMaskedPatchPrediction:
        raise UserError(
            f"--model_name_or_path {model_args.model_name_or_path} holds a {saved_class.__name__}, which has no "
            "pretraining head to do the pretext task with: give a run_pretraining.py checkpoint."
        )
    image_processor = load_image_processor(model_args, preset, config)
    model = build_model(SelfieForMaskedPatchPrediction, model_args, config).to(training_args.device)
    count, seed = visualization_args.num_images, data_args.split_seed
    images = with_image_transform(
        limit_samples(splits["validation"], count, seed), image_transform(image_processor, train=False), image_column
    )
    pixel_values = read_images(images, count)
    if len(pixel_values) == 0:
        raise UserError(f"None of the {count} validation images drawn could be read.")
    tasks = do_pretext_task(model, pixel_values, draw_masks(config, len(pixel_values), seed))
    paths = []
    for index, task in enumerate(tasks):
        paths.append(os.path.join(training_args.output_dir, f"pretext_task_{index}.png"))
        write_pretext_figure([task], config, image_processor, paths[-1])
    logger.info("Drew the pretext task on %d images into %s.", len(tasks), training_args.output_dir)
    return paths
