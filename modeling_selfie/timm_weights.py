"""Selfie's ResNet in timm's tensor names, both ways: start P (and a classifier's stage 4) from a timm checkpoint,
and export P (plus stage 4 and the linear classifier of a `"resnet"`-head classifier) as a timm ResNet state dict.

P is a timm ResNet cut after stage 3, so its own tensor names are already timm's (`conv1.weight`,
`layer3.0.bn1.running_mean`, ...); stage 4 is timm's `layer4` and the classifier timm's `fc`.
"""

import logging
import os

import torch
from safetensors.torch import save_file
from timm.models import load_state_dict
from torch import nn

from .modeling_selfie import SelfiePreTrainedModel


logger = logging.getLogger(__name__)

STEM_WEIGHT = "conv1.weight"


def timm_modules(model: SelfiePreTrainedModel, with_classifier: bool = False) -> dict[str, nn.Module]:
    """The parts of `model` that are a timm ResNet's, keyed by their prefix in timm's names: P (`""`), stage 4
    (`"layer4."`) and, with `with_classifier`, the linear classifier (`"fc."`) of a `"resnet"`-head classifier."""
    parts = {"": model.base_model.patch_network}
    if getattr(model, "stage4", None) is not None:
        parts["layer4."] = model.stage4
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
        raise ValueError(f"{path}: no such file.")
    try:
        state_dict = load_state_dict(path)
    except Exception as error:  # torch.load fails on other files in many ways: UnpicklingError, KeyError, EOFError...
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(
            f"{path} is not a safetensors file or a torch checkpoint that loads with weights_only=True ({reason})."
        ) from error
    if not state_dict or not all(isinstance(tensor, torch.Tensor) for tensor in state_dict.values()):
        raise ValueError(f"{path} holds no state dict of tensors.")
    return state_dict


def load_timm_weights(model: SelfiePreTrainedModel, path: str):
    """Copy the timm checkpoint `path` into P and, for a `"resnet"`-head classifier, stage 4. Every tensor they hold
    must be in the file, with the same shape and finite values; the file's other tensors (an ImageNet classifier,
    ...) are ignored.
    One exception, as with `backbone_pretrained`: with the `"cifar"` stem, a stem convolution of another shape (the
    7x7 one of an ImageNet checkpoint) is not loaded and the 3x3 stem keeps its fresh weights, with a warning."""
    state_dict = read_timm_checkpoint(path)
    copies = []
    for prefix, module in timm_modules(model).items():
        for name, tensor in module.state_dict().items():
            key = prefix + name
            source = state_dict.get(key)
            if key == STEM_WEIGHT and model.config.stem == "cifar" and getattr(source, "shape", None) != tensor.shape:
                logger.warning(
                    "%s: %s is %s, not the CIFAR stem's %s; the stem starts fresh.",
                    path,
                    key,
                    _shape(source),
                    _shape(tensor),
                )
                continue
            if source is None:
                raise ValueError(f"{path} has no tensor {key!r}, which the model's {_part(prefix)} needs.")
            if source.shape != tensor.shape:
                raise ValueError(
                    f"{path}: tensor {key!r} has shape {_shape(source)} but the model's {_part(prefix)} needs "
                    f"{_shape(tensor)} (another backbone, backbone_kwargs or stem?)."
                )
            if source.is_floating_point() and not torch.isfinite(source).all():
                raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values.")
            copies.append((tensor, source))
    with torch.no_grad():
        for tensor, source in copies:
            tensor.copy_(source)  # `state_dict()` shares the module's storage: this writes the weights in place


def _part(prefix: str) -> str:
    return "stage 4" if prefix else "patch network"


def _shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else str(tuple(tensor.shape))
