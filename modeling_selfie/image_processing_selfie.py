"""The image processors of Selfie's three settings: transformers' `BitImageProcessor` (to RGB, resize the shortest
edge, centre crop, rescale to [0, 1], normalise) with each setting's sizes and normalisation; and `to_rgb`, how
the training scripts read an image's pixels."""

import numpy as np
from PIL import Image
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


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB with 8 bits per channel, as the training scripts read every image. transformers' `load_image`
    and image processors convert with PIL alone, which clips one-channel images of more than 8 bits to white (and
    reads float images in [0, 1] as black): pass such images through this first, e.g. `classify(to_rgb(image))`
    with an image-classification pipeline, so that a model sees the pixels it was trained on.

    - one-channel integer images (16-bit PNG and TIFF, 32-bit TIFF): scaled by the smallest range of an even number
      of bits, at least 8, that holds the image's largest value: 0..4095 is read as 12-bit data, so 4095 -> 255,
      and 0..255 as 8-bit data, unchanged. Negative values raise a `ValueError`.
    - float images: values in [0, 1] are scaled by 255; larger ones are levels, by the rule for integers. Negative,
      NaN and infinite values raise a `ValueError`.
    - other modes (1, L, LA, P, RGBA, CMYK, 16-bit colour, ...) are converted by PIL; alpha is dropped and ICC
      profiles are not applied, as in `datasets` and transformers."""
    if image.mode == "F" or image.mode.startswith("I"):
        image = _eight_bit_image(np.asarray(image, dtype=np.float64), fractions=image.mode == "F")
    return image.convert("RGB")


def _eight_bit_image(pixels: np.ndarray, fractions: bool) -> Image.Image:
    """One-channel pixels as an 8-bit image, by `to_rgb`'s rule; `fractions`: values in [0, 1] span 0..255."""
    if not np.isfinite(pixels).all():
        raise ValueError("pixel values that are NaN or infinite")
    if pixels.min() < 0:
        raise ValueError(f"negative pixel values (down to {pixels.min():g})")
    largest = pixels.max()
    if fractions and largest <= 1:
        top = 1.0
    else:
        bits = int(largest).bit_length()
        top = 2.0 ** max(8, bits + bits % 2) - 1
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels * (255 / top)), 0, 255)))
