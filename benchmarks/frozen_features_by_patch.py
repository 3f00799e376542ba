#!/usr/bin/env python
"""P's frozen features read on whole images, as run_evaluation.py and fine-tuning read them, and patch by patch, as
pretraining runs P: where a checkpoint's figures fall on whole images but not patch by patch, what it lost lies in how
its vectors read on a whole image, not in what P draws from a patch on its own.

    python -m benchmarks.frozen_features_by_patch --model_name_or_path CHECKPOINT \\
        --dataset_name ../shared/data/cifar10 --max_train_samples 10000 --max_eval_samples 2000 --output_dir OUT

It takes run_evaluation.py's flags (--config_name and --seed for the random-init baseline) and scores each read with
its k-NN and linear probe:
- `image`: run_evaluation.py's own features, P's stage-3 map of the whole image, average-pooled, BatchNorm on the
  statistics as saved (or re-estimated with --recalibrate_batchnorm, as run_evaluation.py does);
- `patch_mean`: P on each patch on its own, average-pooled, then averaged over the image's patches;
- `patch_grid`: the same vectors side by side in grid order (num_patches x channels), so that the probe can read
  where each lies.
The patch reads put BatchNorm on each batch's statistics (the patches of --per_device_eval_batch_size images; 256 in
the docs' runs), since a checkpoint's saved statistics are whole images'. Writes OUT/features_by_patch.json. Used for
docs/research-log.md.
"""

import copy
import json
import os

import torch
from transformers import TrainingArguments

from modeling_selfie.modeling_selfie import patchify
from selfie_training.data import DataArguments, LabelledSubsetArguments
from selfie_training.errors import UserError
from selfie_training.evaluation import (
    LabelledFeatures,
    _image_batches,
    _in_mode,
    extract_features,
    recalibrate_batchnorm,
)
from selfie_training.feature_evaluation import EvaluationArguments, check_finite, evaluate, load_model_and_images
from selfie_training.runner import ModelArguments, parse_arguments, run, setup


POOLINGS = {"patch_mean": lambda vectors: vectors.mean(dim=1), "patch_grid": lambda vectors: vectors.flatten(1)}


@torch.no_grad()
def patch_features(model, dataset, pooling: str, batch_size: int = 256, num_workers: int = 0) -> LabelledFeatures:
    """P on every patch of every image on its own (BatchNorm on each batch's statistics), each patch's stage-3 map
    average-pooled, the image's `(num_patches, channels)` vectors pooled by `POOLINGS[pooling]`. `model` is left as
    it was: the patches' statistics are gathered on a copy."""
    encoder = copy.deepcopy(getattr(model, "selfie", model))
    features, labels = [], []
    with _in_mode(encoder, training=True):
        for batch in _image_batches(encoder, dataset, batch_size, num_workers):
            pixels = batch["pixel_values"]
            if len(pixels) == 0:  # no image of the batch could be read
                continue
            vectors = encoder.feature_map(patchify(pixels, encoder.config.patch_size)).mean(dim=(2, 3))
            features.append(POOLINGS[pooling](vectors.view(len(pixels), encoder.config.num_patches, -1)).float().cpu())
            labels.append(batch["labels"])
    if not features:
        raise UserError("None of the images could be read, so there are no features to evaluate.")
    return LabelledFeatures(torch.cat(features), torch.cat(labels))


def main(args: list[str] | None = None) -> dict[str, dict]:
    model_args, subset_args, eval_args, data_args, training_args = parse_arguments(
        (
            ModelArguments,
            LabelledSubsetArguments,
            EvaluationArguments,
            DataArguments,
            TrainingArguments,
        ),
        args,
    )
    setup(training_args)
    model, train_images, validation_images, names, _ = load_model_and_images(
        model_args, subset_args, data_args, training_args
    )
    loading = {
        "batch_size": training_args.per_device_eval_batch_size,
        "num_workers": training_args.dataloader_num_workers,
    }
    if eval_args.recalibrate_batchnorm:  # as run_evaluation.py does; the patch reads use each batch's statistics
        recalibrate_batchnorm(model, train_images, **loading)
    reads = {"image": lambda images: extract_features(model, images, **loading)}
    reads.update(
        {pooling: lambda images, p=pooling: patch_features(model, images, p, **loading) for pooling in POOLINGS}
    )
    results = {}
    for read, features in reads.items():
        train, test = (features(images).to(training_args.device) for images in (train_images, validation_images))
        for split, labelled in (("training", train), ("validation", test)):
            check_finite(labelled.features, split, model_args)
        results[read] = {
            "feature_size": train.features.shape[1],
            **evaluate(train, test, len(names), eval_args),
        }
        print(json.dumps({read: results[read]}), flush=True)
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, "features_by_patch.json"), "w") as file:
        json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    run(main)
