#!/usr/bin/env python
"""A pretraining checkpoint's candidate accuracy under the training and the evaluation transforms, on training and
validation images, with BatchNorm on its running statistics or on the batch's: where training and validation
disagree, this tells overfitting, BatchNorm's shared statistics and a shortcut in the training transform apart.

    python benchmarks/candidate_accuracy_by_transform.py CHECKPOINT --dataset_name ../shared/data/cifar10

The splits are the training scripts' (--max_eval_samples 2000 held out with --split_seed 0); `--samples` images of
each are scored, with masks drawn from seed 0. Used for docs/cifar10-cpu-ablation.md.
"""

import argparse

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
from selfie_training.runner import ModelArguments, load_image_processor


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    model = SelfieForMaskedPatchPrediction.from_pretrained(args.checkpoint)
    config = model.config
    # Weights loaded as they are: BatchNorm switched to batch statistics updates running ones, so reload each time.
    processor = load_image_processor(ModelArguments(model_name_or_path=args.checkpoint), "cifar10", config)
    splits = load_splits(DataArguments(dataset_name=args.dataset_name, max_eval_samples=2000))
    transforms = {
        "training (borderless)": image_transform(processor, train=True, borderless=True),
        "training (padded)": image_transform(processor, train=True),
        "evaluation": image_transform(processor, train=False),
    }
    masks = (config.num_patches, config.num_masked_patches)
    for split_name, split in splits.items():
        images = split.select(range(min(args.samples, len(split))))
        column = find_image_column(images)
        for transform_name, transform in transforms.items():
            for on_batch in (False, True):
                model = SelfieForMaskedPatchPrediction.from_pretrained(args.checkpoint)
                dataset = with_image_transform(images, transform, column, stream=RandomStream(0), mask_sizes=masks)
                accuracy = candidate_accuracy(model, dataset, on_batch)
                statistics = "the batch's" if on_batch else "running"
                print(
                    f"{split_name} images, {transform_name} transform, BatchNorm on {statistics} statistics: "
                    f"candidate accuracy {accuracy:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
