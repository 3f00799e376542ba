"""The image processors of Selfie's three settings: transformers' `BitImageProcessor` (to RGB, resize the shortest
edge, centre crop, rescale to [0, 1], normalise) with each setting's sizes and normalisation."""

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_selfie import PRESETS


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Each preset's normalisation, and the shortest edge that images are resized to before the centre crop.
PRESET_IMAGE_PROCESSING = {
    "cifar10": {"image_mean": CIFAR10_MEAN, "image_std": CIFAR10_STD, "shortest_edge": 32},
    "imagenet32": {"image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD, "shortest_edge": 32},
    "imagenet224": {"image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD, "shortest_edge": 256},
}


def preset_image_processor(name: str, **kwargs) -> BitImageProcessor:
    """The evaluation image pipeline of the preset `name` (see `PRESETS`), with `kwargs` overriding its settings;
    the training scripts' transforms follow the same steps, and save it with every checkpoint."""
    if name not in PRESET_IMAGE_PROCESSING:
        raise ValueError(f"Unknown Selfie preset {name!r}; choose one of {', '.join(PRESETS)}.")
    processing, image_size = PRESET_IMAGE_PROCESSING[name], PRESETS[name]["image_size"]
    settings = {
        "resample": PILImageResampling.BILINEAR,  # as the training scripts' torchvision transforms
        "size": {"shortest_edge": processing["shortest_edge"]},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": list(processing["image_mean"]),
        "image_std": list(processing["image_std"]),
    }
    return BitImageProcessor(**{**settings, **kwargs})
