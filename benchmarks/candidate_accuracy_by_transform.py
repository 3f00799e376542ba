#!/usr/bin/env python
"""A pretraining checkpoint's candidate accuracy under the training transforms (pretraining's crop, the same crop
unaligned to the patch grid, and the padded crop) and the evaluation transform, on training and validation images,
with BatchNorm on its running statistics or on the batch's: where training and validation disagree, this tells
overfitting, BatchNorm's shared statistics and a shortcut in the training transform apart.

    python -m benchmarks.candidate_accuracy_by_transform CHECKPOINT --dataset_name ../shared/data/cifar10

`--num_masked_patches N` scores Selfie's own task with N positions hidden at random, whatever the checkpoint was
pretrained with: `--num_masked_patches 4` puts a checkpoint of the split objective (8 of 16 hidden, chance 12.5%) on
the paper's CIFAR-10 task (4 of 16, chance 25%), the setting of the paper's own candidate accuracies.

The splits are the training scripts' (--max_eval_samples 2000 held out with --split_seed 0); `--samples` images of
each are scored, with masks drawn from seed 0. Used for docs/research-log.md.
"""

import argparse
import copy

import torch
from torch.utils.data import DataLoader

from modeling_selfie import SelfieForMaskedPatchPrediction
from selfie_training.data import (
    DataArguments,
    RandomStream,
    collate_images,
    find_image_column,
    image_transform,
    load_splits,
    with_image_transform,
)
from selfie_training.errors import UserError
from selfie_training.runner import ModelArguments, build_config, int_at_least, load_image_processor


@torch.no_grad()
def candidate_accuracy(model, dataset, batch_norm_on_batch: bool, batch_size: int = 128) -> float:
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train(batch_norm_on_batch)
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_images):
        outputs = model(batch["pixel_values"], bool_masked_pos=batch["bool_masked_pos"])
        correct += outputs.accuracy.item() * len(batch["pixel_values"])
        total += len(batch["pixel_values"])
    return correct / total


def load_checkpoint(
    checkpoint: str, dataset_name: str, max_eval_samples: int = 2000, num_masked_patches: int | None = None
) -> tuple:
    """A pretraining checkpoint, its image processor, and the training scripts' splits (--max_eval_samples held out
    with --split_seed 0). With `num_masked_patches`, the model scores Selfie's own task with that many positions
    hidden at random (the split objective's second direction and contrastive term need half the grid: dropped)."""
    model_args = ModelArguments(model_name_or_path=checkpoint)
    task = {}  # the checkpoint's own
    if num_masked_patches is not None:
        task = {"masking_strategy": "random", "num_masked_patches": num_masked_patches, "image_contrastive_weight": 0}
    config = build_config(model_args, "cifar10", **task)  # validated as the training scripts do: one-line UserErrors
    model, loading = SelfieForMaskedPatchPrediction.from_pretrained(
        checkpoint, config=config, output_loading_info=True
    )
    missing = sorted(loading["missing_keys"])
    if missing:  # the weights it lacks would be random, and so would the figures
        raise UserError(
            f"{checkpoint} is not a pretraining checkpoint: it has no weights for {len(missing)} of the pretraining "
            f"model's tensors ({missing[0]!r}, ...), which would be random."
        )
    processor = load_image_processor(model_args, "cifar10", model.config)
    splits = load_splits(DataArguments(dataset_name=dataset_name, max_eval_samples=max_eval_samples))
    return model, processor, splits


def masked_images(images, transform, config):
    """`images` under `transform`, with masks drawn from seed 0: every scoring of the same images sees the same masks."""
    masks = (config.num_patches, config.num_masked_patches)
    return with_image_transform(images, transform, find_image_column(images), stream=RandomStream(0), mask_sizes=masks)


def main(argv: list[str] | None = None) -> dict[tuple[str, str, bool], float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--samples", type=int_at_least(1), default=2000)
    parser.add_argument(
        "--max_eval_samples", type=int_at_least(1), default=2000, help="The validation split's size, as trained."
    )
    parser.add_argument(
        "--num_masked_patches", type=int, help="Hide this many positions at random (default: the checkpoint's task)."
    )
    args = parser.parse_args(argv)
    try:
        pretrained, processor, splits = load_checkpoint(
            args.checkpoint, args.dataset_name, args.max_eval_samples, args.num_masked_patches
        )
    except UserError as error:  # names the field and value at fault
        parser.error(str(error))
    transforms = {
        "training (pretraining's)": image_transform(processor, train=True, patch_grid=pretrained.config.grid_size),
        # The same crop with any sides (a grid of one cell): resampled at offsets that drift from patch to patch.
        "training (unaligned)": image_transform(processor, train=True, patch_grid=(1, 1)),
        "training (padded)": image_transform(processor, train=True),
        "evaluation": image_transform(processor, train=False),
    }
    accuracies = {}
    for split_name, split in splits.items():
        images = split.select(range(min(args.samples, len(split))))
        for transform_name, transform in transforms.items():
            for on_batch in (False, True):
                # BatchNorm switched to batch statistics updates the running ones, so every scoring gets a fresh copy.
                model = copy.deepcopy(pretrained)
                accuracy = candidate_accuracy(model, masked_images(images, transform, model.config), on_batch)
                accuracies[split_name, transform_name, on_batch] = accuracy
                statistics = "the batch's" if on_batch else "running"
                print(
                    f"{split_name} images, {transform_name} transform, BatchNorm on {statistics} statistics: "
                    f"candidate accuracy {accuracy:.3f}",
                    flush=True,
                )
    return accuracies


if __name__ == "__main__":
    main()
