#!/usr/bin/env python
"""Evaluate the frozen features of a Selfie patch network: k-NN and linear-probe accuracy on a labelled dataset.

    python run_evaluation.py --model_name_or_path outputs/selfie-cifar10 --dataset_name uoft-cs/cifar10 \\
        --output_dir outputs/selfie-cifar10-eval

An image's features are P's stage-3 feature map of the whole image, average-pooled. The training split's
features (all of them, or a class-balanced --label_fraction / --labels_per_class) are the k-NN memory bank and
the probe's training set; the validation split is the test. --config_name builds the checkpoint's architecture
with fresh weights (drawn with --seed) instead: the random-init baseline. Writes eval_results.json (and
all_results.json) into --output_dir, and, for a checkpoint folder with a model card, the figures into its card.
With no dataset it evaluates on scikit-learn's handwritten digits. `--help` lists the flags; a JSON file of them
works as well. Runs on one process, on the GPU where there is one.
"""

from selfie_training.feature_evaluation import main
from selfie_training.runner import run


if __name__ == "__main__":
    run(main)
