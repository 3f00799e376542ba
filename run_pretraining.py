#!/usr/bin/env python
"""Pretrain Selfie on (unlabelled) images with the transformers `Trainer`.

    python run_pretraining.py --dataset_name uoft-cs/cifar10 --output_dir outputs/selfie-cifar10 --do_train --do_eval \\
        --per_device_train_batch_size 512 --learning_rate 1e-3 --weight_decay 0.05 --num_train_epochs 30

Runs as it is with `python` or with `accelerate launch`; `python run_pretraining.py --help` lists the flags
(all of `TrainingArguments` too), and a single JSON file of them works as well. With no dataset, it pretrains on
scikit-learn's handwritten digits.
"""

from selfie_training.pretraining import main
from selfie_training.runner import run


if __name__ == "__main__":
    run(main)
