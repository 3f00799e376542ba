#!/usr/bin/env python
"""Export the ResNet of a Selfie checkpoint as a timm state dict in safetensors, for timm users' own code.

    python export_timm.py --model_name_or_path outputs/selfie-cifar10 --output_file selfie-resnet50.safetensors

A pretraining checkpoint gives P (timm's `conv1`, `bn1`, `layer1`-`layer3`); a classifier with the `resnet` head
also its stage 4 (`layer4`) and linear classifier (`fc`). The README shows the `timm.create_model` call that loads
each kind, and how to build the CIFAR stem. The file goes outside the checkpoint's folder, and replaces an existing
file only with --overwrite.
"""

from selfie_training.export import main
from selfie_training.runner import run


if __name__ == "__main__":
    run(main)
