#!/usr/bin/env python
"""Fine-tune a Selfie classifier, from a Selfie pretraining checkpoint or from scratch, on all or a class-balanced
fraction of the labels, with the transformers `Trainer`.

    python run_image_classification.py --dataset_name uoft-cs/cifar10 --model_name_or_path outputs/selfie-cifar10 \\
        --label_fraction 0.05 --label_seed 0 --do_train --do_eval \\
        --output_dir outputs/cifar10-5pct-selfie

Without --model_name_or_path it trains the same architecture from scratch (give --config_name to copy a
checkpoint's architecture exactly): the supervised baseline. The labelled subset depends on --label_seed alone,
so every method sees the same images. Runs with `python` or `accelerate launch`; `--help` lists the flags.
"""

from selfie_training.classification import main
from selfie_training.runner import run


if __name__ == "__main__":
    run(main)
