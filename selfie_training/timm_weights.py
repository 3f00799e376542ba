"""Selfie's ResNet in timm's tensor names, both ways: start P (and a classifier's stage 4) from timm's pretrained
weights or a timm checkpoint, and export P (plus stage 4 and the linear classifier of a `"resnet"`-head classifier) as
a timm ResNet state dict. The one place where the training package reads timm weights: the models never download.

P is a timm ResNet cut after stage 3, so its own tensor names are already timm's (`conv1.weight`,
`layer3.0.bn1.running_mean`, ...); stage 4 is timm's `layer4` and the classifier timm's `fc`.
"""

import logging
import os

import timm
import torch
from safetensors.torch import save_file
from timm.models import load_state_dict
from torch import nn

from modeling_selfie import SelfiePreTrainedModel

from .errors import UserError, first_line


logger = logging.getLogger(__name__)

STEM_WEIGHT = "conv1.weight"
TIMM_WEIGHTS = (
    "timm"  # the --backbone_weights value, and the "weights" of its stage, for timm's own pretrained weights
)


def timm_modules(model: SelfiePreTrainedModel, with_classifier: bool = False) -> dict[str, nn.Module]:
    """The parts of `model` that are a timm ResNet's, keyed by their prefix in timm's names: P (`""`), stage 4
    (`"layer4."`) and, with `with_classifier`, the linear classifier (`"fc."`) of a `"resnet"`-head classifier."""
    parts = {"": model.base_model.patch_network}
    if getattr(model, "layer4", None) is not None:
        parts["layer4."] = model.layer4
        if with_classifier and isinstance(model.classifier, nn.Linear):
            parts["fc."] = model.classifier
    return parts


def timm_state_dict(model: SelfiePreTrainedModel) -> dict[str, torch.Tensor]:
    """The weights of `model`'s ResNet (P; stage 4 and the classifier where it has them) in timm's names."""
    return {
        prefix + name: tensor.detach().contiguous()
        for prefix, module in timm_modules(model, with_classifier=True).items()
        for name, tensor in module.state_dict().items()
    }


def save_timm_weights(model: SelfiePreTrainedModel, path: str):
    """Write `timm_state_dict(model)` to the safetensors file `path`, which timm loads with
    `pretrained_cfg_overlay=dict(file=path)` (see the README for the call that fits each kind of checkpoint)."""
    save_file(timm_state_dict(model), path, metadata={"format": "pt"})


def read_timm_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a timm checkpoint file, read as timm reads it: safetensors by the `.safetensors` suffix,
    anything else with `torch.load(weights_only=True)`, which runs no code; timm's training checkpoints are
    unwrapped (`state_dict_ema`, `state_dict`, `module.` prefixes)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file.")
    try:
        state_dict = load_state_dict(path)
    except Exception as error:  # torch.load fails on other files in many ways: UnpicklingError, KeyError, EOFError...
        raise UserError(
            f"{path} is not a safetensors file or a torch checkpoint that loads with weights_only=True "
            f"({first_line(error)})."
        ) from error
    if not state_dict or not all(isinstance(tensor, torch.Tensor) for tensor in state_dict.values()):
        raise UserError(f"{path} holds no state dict of tensors.")
    return state_dict


def download_timm_weights(model: SelfiePreTrainedModel) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of the model's backbone (from the Hugging Face Hub, or its cache)."""
    config = model.config
    if config.backbone_norm != "batchnorm":
        raise UserError(f"timm's weights need backbone_norm='batchnorm', not {config.backbone_norm!r}.")
    try:
        resnet = timm.create_model(
            config.backbone,
            pretrained=True,
            num_classes=0,
            in_chans=config.num_channels,
            **(config.backbone_kwargs or {}),
        )
    except OSError as error:
        raise UserError(f"timm's {config.backbone} weights could not be fetched ({first_line(error)}).") from error
    return resnet.state_dict()


def load_timm_weights(model: SelfiePreTrainedModel, source: str):
    """Copy timm weights into P and, for a `"resnet"`-head classifier, stage 4: timm's pretrained weights of the
    model's backbone where `source` is `TIMM_WEIGHTS` ("timm"), else the timm checkpoint file `source`. Every tensor
    they hold must be there, with the same shape and finite values; other tensors (an ImageNet classifier, ...) are
    ignored.
    One exception: with the `"cifar"` stem, a stem convolution of another shape (the 7x7 one of an ImageNet
    checkpoint) is not loaded and the 3x3 stem keeps its fresh weights, with a warning."""
    if source == TIMM_WEIGHTS:
        state_dict, origin = download_timm_weights(model), f"timm's {model.config.backbone} weights"
    else:
        state_dict, origin = read_timm_checkpoint(source), source
    copies = []
    for prefix, module in timm_modules(model).items():
        for name, tensor in module.state_dict().items():
            key = prefix + name
            weights = state_dict.get(key)
            if key == STEM_WEIGHT and model.config.stem == "cifar" and getattr(weights, "shape", None) != tensor.shape:
                logger.warning(
                    "%s: %s is %s, not the CIFAR stem's %s; the stem starts fresh.",
                    origin,
                    key,
                    _shape(weights),
                    _shape(tensor),
                )
                continue
            if weights is None:
                raise UserError(f"{origin} has no tensor {key!r}, which the model's {_part(prefix)} needs.")
            if weights.shape != tensor.shape:
                raise UserError(
                    f"{origin}: tensor {key!r} has shape {_shape(weights)} but the model's {_part(prefix)} needs "
                    f"{_shape(tensor)} (another backbone, backbone_kwargs or stem?)."
                )
            if weights.is_floating_point() and not torch.isfinite(weights).all():
                raise UserError(f"{origin}: tensor {key!r} holds NaN or infinite values.")
            copies.append((tensor, weights))
    with torch.no_grad():
        for tensor, weights in copies:
            tensor.copy_(weights)  # `state_dict()` shares the module's storage: this writes the weights in place


def _part(prefix: str) -> str:
    return "stage 4" if prefix else "patch network"


def _shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else str(tuple(tensor.shape))
