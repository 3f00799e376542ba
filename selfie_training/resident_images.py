"""Images resident on the training device, as the CIFAR-10 speed runs keep them (airbench, hlb-CIFAR10): a split
that fits in memory is decoded once into one uint8 tensor on the device, and each batch is gathered, cropped,
flipped, normalised and masked there by operations on the whole batch: no Python per image, and nothing copied from
the host but the batch's indices. `image_pipeline` chooses this path or the per-image one (`data.with_image_transform`:
images decoded and transformed one by one in DataLoader workers), which streamed, larger or variously sized
datasets and the options that transform images one by one take."""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Image as ImageFeature
from datasets import IterableDataset
from torchvision.transforms import v2
from transformers import BitImageProcessor, TrainingArguments

from modeling_selfie import random_patch_mask

from .batched_augmentation import Normalize, PaddedRandomCrops, RandomResizedCrops
from .data import (
    LARGE_IMAGE_CROP_SCALE,
    SMALL_IMAGE_CROP_SCALE,
    UNREADABLE_IMAGE_ERRORS,
    DataArguments,
    RandomStream,
    collate_images,
    crop_size,
    evaluation_image,
    image_transform,
    read_image,
    unreadable_note,
    with_image_transform,
)


logger = logging.getLogger(__name__)

# The most 8-bit pixel data, in bytes, that the splits of a run may hold to be kept resident.
RESIDENT_BYTES = 4 * 2**30


class NotResident(Exception):
    """Why a dataset's images cannot be kept resident."""


class DeviceStream:
    """The data pipeline's random stream (`data.RandomStream`) as a generator on the training device, which the
    crops, flips and masks of resident batches draw from. Its state is kept as bytes, not a tensor, so that it rides
    in the batch untouched: accelerate moves every tensor of a batch to the device, and a copy from pageable host
    memory makes the host wait for the device."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.generator = torch.Generator(device)
        self.reset()

    def reset(self):
        self.generator.manual_seed(self.seed)

    @property
    def state(self) -> bytes:
        return self.generator.get_state().numpy().tobytes()

    @state.setter
    def state(self, state: bytes):
        self.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


class ResidentImages(torch.utils.data.Dataset):
    """A split's images as one `(N, 3, H, W)` uint8 tensor on the training device, with their labels (or none), whose
    batches are made there: `__getitems__` gathers a batch's images, crops and flips them (`augment`, training),
    normalises them and draws masks (`mask_sizes`: `num_patches`, `num_masked_patches`), drawing from `stream`, and
    notes the stream's state after the batch, as `collate_images` does. The Trainer's DataLoader reads it with its
    own sampler, sharding and resuming, in the training process (`take_batch` is its collator). `unreadable` names
    the images that could not be decoded, left out at load."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        normalize: Normalize,
        augment=None,
        stream: DeviceStream | None = None,
        mask_sizes: tuple[int, int] | None = None,
        unreadable: list[str] = (),
    ):
        self.images, self.labels, self.normalize, self.augment = images, labels, normalize, augment
        self.stream, self.mask_sizes, self.unreadable = stream, mask_sizes, list(unreadable)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict:
        device = self.images.device
        # From pinned memory the indices reach the device without the host waiting for it.
        index = torch.tensor(indices, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        generator = self.stream.generator if self.stream is not None else None
        images = self.images[index]
        if self.augment is not None:
            images = self.augment(images, generator)
        batch = {"pixel_values": self.normalize(images)}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        if self.mask_sizes is not None:
            batch["bool_masked_pos"] = random_patch_mask(len(indices), *self.mask_sizes, device, generator)
        if self.stream is not None:
            batch["data_stream_state"] = self.stream.state
        return batch


def take_batch(batch: dict) -> dict:
    """The collator of `ResidentImages`, whose `__getitems__` makes the whole batch."""
    return batch


@dataclass(frozen=True)
class ImageSplits:
    """What a run's image pipeline reads and makes: its training and evaluation splits, their image and label columns
    (no label column for pretraining), the image processor, and the training transform's `patch_grid` and
    `trivial_augment` (`data.image_transform`); `mask_sizes` (`num_patches`, `num_masked_patches`) draws a mask for
    every image of both splits."""

    train: object
    validation: object
    image_column: str
    processor: BitImageProcessor
    label_column: str | None = None
    patch_grid: tuple[int, int] | None = None
    mask_sizes: tuple[int, int] | None = None
    trivial_augment: bool = False


def image_pipeline(splits: ImageSplits, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """The Trainer's `train_dataset`, `eval_dataset`, `data_collator`, `data_stream` and `eval_stream` (evaluation's
    masks): resident images (`resident_pipeline`) where --resident_images allows them and the data fit, else the
    per-image path."""
    reason = _per_image_reason(splits, data_args)
    if reason is None:
        try:
            return resident_pipeline(splits, training_args)
        except NotResident as error:
            reason = str(error)
    logger.info("Images decoded and transformed one by one in DataLoader workers: %s.", reason)
    return per_image_pipeline(splits, data_args, training_args)


def per_image_pipeline(splits: ImageSplits, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """`image_pipeline`'s datasets transformed image by image as they are read (`data.with_image_transform`), each
    batch's random draws from a `data.RandomStream`."""
    train_stream = RandomStream(training_args.seed)
    eval_stream = RandomStream(training_args.seed) if splits.mask_sizes is not None else None
    train_transform = image_transform(
        splits.processor, train=True, channel_drop_prob=data_args.channel_drop_prob, patch_grid=splits.patch_grid,
        trivial_augment=splits.trivial_augment,
    )  # fmt: skip
    eval_transform = image_transform(splits.processor, train=False)
    columns = {"image_column": splits.image_column, "label_column": splits.label_column}
    return {
        "train_dataset": with_image_transform(
            splits.train, train_transform, **columns, stream=train_stream, mask_sizes=splits.mask_sizes
        ),
        "eval_dataset": with_image_transform(
            splits.validation, eval_transform, **columns, stream=eval_stream, mask_sizes=splits.mask_sizes
        ),
        "data_collator": collate_images,
        "data_stream": train_stream,
        "eval_stream": eval_stream,
    }


def _per_image_reason(splits: ImageSplits, data_args: DataArguments) -> str | None:
    """Why the run must take the per-image path whatever its data hold, or None."""
    if not data_args.resident_images:
        return "--resident_images False"
    if isinstance(splits.train, IterableDataset) or isinstance(splits.validation, IterableDataset):
        return "--streaming reads the images as they come"
    if splits.trivial_augment:
        return "--trivial_augment transforms images one by one"
    if data_args.channel_drop_prob > 0:
        return "--channel_drop_prob transforms images one by one"
    return None


def resident_pipeline(splits: ImageSplits, training_args: TrainingArguments) -> dict:
    """`image_pipeline`'s datasets as `ResidentImages` on the training device: the training images decoded as they
    are (or with their shortest edge resized, for the padded crops of small images) and augmented by batch as
    `data.image_transform` augments each image; the evaluation images decoded, resized and centre-cropped at load,
    as the evaluation transform does. The training split only where the run trains. Raises `NotResident` where the
    training images differ in size or the splits hold more than `RESIDENT_BYTES`."""
    device = training_args.device
    processor = splits.processor
    size = crop_size(processor)
    normalize = Normalize(processor.image_mean, processor.image_std, device)
    train_stream = DeviceStream(training_args.seed, device)
    columns, budget = (splits.image_column, splits.label_column), RESIDENT_BYTES
    train_images = None
    if training_args.do_train:
        load, augment = training_augmentation(size, splits.patch_grid)
        images, labels, unreadable = decode_split(splits.train, *columns, load, budget, "training")
        if isinstance(augment, PaddedRandomCrops) and not augment.fits(images.shape[2:]):
            raise NotResident(f"its training images of {tuple(images.shape[2:])} pixels are smaller than the crop")
        budget -= images.numel()
        train_images = ResidentImages(
            images.to(device), _to(labels, device), normalize, augment, train_stream, splits.mask_sizes, unreadable
        )
    images, labels, unreadable = decode_split(
        splits.validation, *columns, evaluation_image(processor), budget, "evaluation"
    )
    eval_stream = DeviceStream(training_args.seed, device) if splits.mask_sizes is not None else None
    eval_images = ResidentImages(
        images.to(device), _to(labels, device), normalize, None, eval_stream, splits.mask_sizes, unreadable
    )
    megabytes = sum(split.images.numel() for split in (train_images, eval_images) if split is not None) / 1e6
    logger.info(
        "Images resident on %s (%.1f MB): batches are made there, in the training process (--dataloader_num_workers "
        "does not apply; --resident_images False for the per-image path).",
        device,
        megabytes,
    )
    # No DataLoader workers, which could not reach the device, and no host memory to pin.
    training_args.dataloader_num_workers, training_args.dataloader_pin_memory = 0, False
    training_args.dataloader_persistent_workers, training_args.dataloader_prefetch_factor = False, None
    return {
        "train_dataset": train_images,
        "eval_dataset": eval_images,
        "data_collator": take_batch,
        "data_stream": train_stream,
        "eval_stream": eval_stream,
    }


def training_augmentation(size: tuple[int, int], patch_grid: tuple[int, int] | None) -> tuple:
    """`data.image_transform`'s training crop and flip for images of crop size `size`, as the steps applied to each
    image once at load and the augmentation of batches."""
    if patch_grid is not None:
        scale = SMALL_IMAGE_CROP_SCALE if max(size) <= 64 else LARGE_IMAGE_CROP_SCALE
        return v2.ToImage(), RandomResizedCrops(size, scale, patch_grid)
    if max(size) <= 64:
        return v2.Compose([v2.ToImage(), v2.Resize(min(size))]), PaddedRandomCrops(size, min(size) // 8)
    return v2.ToImage(), RandomResizedCrops(size, LARGE_IMAGE_CROP_SCALE)


def decode_split(dataset, image_column: str, label_column: str | None, load, max_bytes: int, name: str) -> tuple:
    """Every image of `dataset` read (`data.read_image`) and loaded by `load` (PIL image -> uint8 tensor), in one
    `(N, 3, H, W)` uint8 tensor on the host; their labels (None without `label_column`); and the images that could not
    be read, named. Raises `NotResident` where the loaded images differ in size or would pass `max_bytes`."""
    entries = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    images, rows, unreadable = None, [], []
    for row, entry in enumerate(entry for batch in entries.iter(batch_size=256) for entry in batch[image_column]):
        try:
            pixels = load(read_image(entry))
        except UNREADABLE_IMAGE_ERRORS as error:
            unreadable.append(unreadable_note(entry, error))
            continue
        if images is None:
            if len(dataset) * pixels.numel() > max_bytes:
                raise NotResident(f"its images would take more than {RESIDENT_BYTES / 2**30:g} GiB as 8-bit pixels")
            images = torch.empty((len(dataset), *pixels.shape), dtype=torch.uint8)
        elif pixels.shape != images.shape[1:]:
            raise NotResident(f"its {name} images differ in size ({tuple(images.shape[1:])}, {tuple(pixels.shape)})")
        images[len(rows)] = pixels
        rows.append(row)
    if images is None:
        raise NotResident(f"none of its {name} images could be read")
    labels = None
    if label_column is not None:
        labels = np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])
        labels = torch.from_numpy(labels)[rows]
    return images[: len(rows)], labels, unreadable


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
