"""Data for the Selfie scripts: loading, columns, labelled subsets, image transforms and collators."""

import io
import itertools
import logging
import math
import os
import re
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset, Value, load_dataset
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from PIL import Image, ImageOps
from torchvision.transforms import v2
from transformers import BitImageProcessor

from modeling_selfie import PRESETS, random_patch_mask, to_rgb

from .errors import UserError, first_line
from .hub import unreachable_reason


logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
DIGITS = "sklearn-digits"  # the embedded default dataset


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset on the Hugging Face Hub (e.g. uoft-cs/cifar10) or a local folder of images "
            "(imagefolder) or of parquet/arrow files. Default: scikit-learn's handwritten digits, embedded."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "A local folder of training images or files."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "A local folder of validation images or files."}
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": f"The image column. Default: the first of {IMAGE_COLUMNS} or of Image type."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": f"The label column. Default: the first of {LABEL_COLUMNS}."}
    )
    train_val_split: float = field(
        default=0.1, metadata={"help": "Share of train held out for validation where the dataset has no such split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training images."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use at most this many validation images. With --streaming and no validation split, this many "
            "(default 1000) are held out from the start of train."
        },
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it whole."})
    preset: str | None = field(
        default=None,
        metadata={
            "help": "Image size, patch grid, stem and normalisation of one of the paper's settings. Default: "
            "cifar10 for CIFAR datasets, else imagenet32 for images up to 64 pixels, else imagenet224.",
            "choices": list(PRESETS),
        },
    )
    channel_drop_prob: float = field(
        default=0.0,
        metadata={"help": "CPC v2's colour augmentation: with this probability keep one random colour channel."},
    )
    resident_images: bool = field(
        default=True,
        metadata={
            "help": "Decode a dataset that fits in memory (up to 4 GiB of 8-bit pixels, training images of one size) "
            "once onto the training device, and crop, flip, normalise and mask whole batches there. False, and "
            "with --streaming, --trivial_augment or --channel_drop_prob: decode and transform image by image in "
            "DataLoader workers."
        },
    )
    max_unreadable_fraction: float = field(
        default=0.01,
        metadata={
            "help": "Images that cannot be decoded are skipped and named in unreadable_images.txt in --output_dir; "
            "the run stops once more than this share of the images read is unreadable."
        },
    )
    split_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the validation split carved from train and of --max_*_samples; apart from --seed, so "
            "that runs with different training seeds see the same images."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded datasets."})
    # Set by `load_splits`: the dataset's split that the runs evaluate on ("validation", "test", or "train" for
    # images held out from it), for the model card's metadata.
    evaluation_split: str = field(default="validation", init=False)

    def __post_init__(self):
        # `not 0 <= x <= 1` holds for NaN too, which every comparison fails.
        shares = {
            "--channel_drop_prob": self.channel_drop_prob,
            "--max_unreadable_fraction": self.max_unreadable_fraction,
        }
        for flag, value in shares.items():
            if not 0 <= value <= 1:
                raise UserError(f"{flag} {value} must be in [0, 1].")
        if not 0 < self.train_val_split < 1:
            raise UserError(f"--train_val_split {self.train_val_split} must be in (0, 1).")
        for flag, value in {
            "--max_train_samples": self.max_train_samples,
            "--max_eval_samples": self.max_eval_samples,
        }.items():
            if value is not None and value < 0:
                raise UserError(f"{flag} {value} must be at least 0.")
        check_seed("--split_seed", self.split_seed)

    @property
    def source(self) -> str:
        """The data's name in model cards: the dataset, the training folder, or the embedded digits."""
        return self.dataset_name or self.train_dir or DIGITS


def load_splits(args: DataArguments, token: str | None = None) -> dict:
    """The `train` and `validation` splits the arguments name (a Hub dataset read with `token`, where given);
    validation carved from train if absent."""
    if args.dataset_name is not None:
        splits = dict(_load("--dataset_name", args.dataset_name, args, name=args.dataset_config_name, token=token))
    elif args.train_dir is not None:
        splits = {"train": _load("--train_dir", args.train_dir, args, split="train")}
        if args.validation_dir is not None:
            splits["validation"] = _load("--validation_dir", args.validation_dir, args, split="train")
    else:
        logger.info("No dataset given: using scikit-learn's handwritten digits (1,797 images, 10 classes).")
        splits = dict(digits_dataset())
    if "train" not in splits:
        raise UserError(f"The dataset has no 'train' split (it has: {', '.join(splits) or 'none'}).")
    train = splits["train"]
    named = [name for name in ("validation", "test") if name in splits]
    args.evaluation_split = named[0] if named else "train"  # "train": validation images are held out from it
    validation = splits[named[0]] if named else None
    held_out_stream = validation is None and args.streaming
    if validation is None:
        train, validation = _hold_out(train, args)
    splits = {
        "train": limit_samples(train, args.max_train_samples, args.split_seed),
        "validation": limit_samples(validation, args.max_eval_samples, args.split_seed),
    }
    for name, split in splits.items():
        if _is_empty(split):
            # A stream without a validation split gives its first --max_eval_samples images to validation.
            held_out = isinstance(split, IterableDataset) and held_out_stream and name == "train"
            reason = (
                f": the stream holds no more images than the {args.max_eval_samples or 1000} held out for validation "
                "(lower --max_eval_samples, or give a validation split)"
                if held_out
                else ""
            )
            raise UserError(f"The {name} split of the dataset is empty{reason}.")
    return splits


def _is_empty(split) -> bool:
    if isinstance(split, IterableDataset):
        return next(iter(split.take(1)), None) is None
    return len(split) == 0


# The `datasets` builder for a single data file, by its extension (a folder or a Hub name needs none).
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _load(flag: str, path: str, args: DataArguments, **kwargs):
    # On a local folder, `load_dataset` picks the builder from its files: imagefolder, parquet, arrow, ...
    source = path
    if os.path.isfile(path):  # which `load_dataset` would look for as a folder or a Hub name
        source = DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if source is None:
            raise UserError(
                f"{flag} {path} is a file: give the folder that holds the data, or a single "
                f"{', '.join(DATA_FILE_BUILDERS)} file."
            )
        kwargs["data_files"] = path
    try:
        return load_dataset(source, cache_dir=args.cache_dir, streaming=args.streaming, **kwargs)
    except (FileNotFoundError, ValueError) as error:  # no such dataset or files; no data in them
        raise UserError(f"{flag} {path}: {first_line(error)}") from error
    except ConnectionError as error:  # a Hub dataset, offline (`hub.check_hub`) and not in the local cache
        raise UserError(
            f"{flag} {path} is not in the local cache, and the Hub cannot be reached "
            f"({unreachable_reason() or first_line(error)})."
        ) from error


def _hold_out(train, args: DataArguments):
    if isinstance(train, IterableDataset):
        size = args.max_eval_samples or 1000
        return train.skip(size), train.take(size)
    label_column = find_label_column(train, args.label_column_name, required=False)
    classes = train.features.get(label_column)
    # Stratified where the held-out share can hold every class (datasets rounds it up).
    held_out = math.ceil(args.train_val_split * len(train))
    stratify = label_column if isinstance(classes, ClassLabel) and held_out >= classes.num_classes else None
    split = train.train_test_split(test_size=args.train_val_split, seed=args.split_seed, stratify_by_column=stratify)
    return split["train"], split["test"]


def limit_samples(dataset, max_samples: int | None, seed: int):
    """At most `max_samples` images of the dataset, drawn with `seed` (the first ones of a stream)."""
    if max_samples is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.take(max_samples)
    return dataset.shuffle(seed=seed).select(range(min(max_samples, len(dataset))))


def digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 handwritten digits as 32x32 RGB images: a small real dataset that works offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray(np.uint8(pixels * 255 / 16)).resize((32, 32), Image.Resampling.BILINEAR).convert("RGB")
        for pixels in digits.images
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return DatasetDict(
        {"train": Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)}
    )


def _column_names(dataset) -> list[str]:
    return list(dataset.features) if dataset.features is not None else list(dataset.column_names or [])


def find_image_column(dataset, given: str | None = None) -> str:
    columns = _column_names(dataset)
    if given is not None:
        _check_column(given, columns, "--image_column_name")
        return given
    of_image_type = [name for name in columns if isinstance((dataset.features or {}).get(name), ImageFeature)]
    for name in [*IMAGE_COLUMNS, *of_image_type]:
        if name in columns:
            return name
    raise UserError(f"No image column found among the dataset's columns {columns}; name it with --image_column_name.")


def find_label_column(dataset, given: str | None = None, required: bool = True) -> str | None:
    columns = _column_names(dataset)
    if given is not None:
        _check_column(given, columns, "--label_column_name")
        return given
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    if required:
        raise UserError(
            f"No label column found among the dataset's columns {columns}; name it with --label_column_name."
        )
    return None


def _check_column(name: str, columns: list[str], flag: str):
    if name not in columns:
        raise UserError(f"{flag} {name!r} is not a column of the dataset; its columns are {columns}.")


CLASS_DTYPES = ("int", "uint", "string", "large_string", "bool")  # the `Value` types that hold a class


def encode_labels(dataset, label_column: str, names: list[str] | None = None) -> tuple:
    """The dataset with its label column as a `ClassLabel`, and the class names. A column that is not one already
    is encoded with `names` (train's classes) where given, else with its own sorted values."""
    if label_column not in _column_names(dataset):
        raise UserError(f"A split has no label column {label_column!r}; its columns are {_column_names(dataset)}.")
    feature = dataset.features.get(label_column) if dataset.features else None
    if isinstance(dataset, IterableDataset) and not isinstance(feature, ClassLabel):
        raise UserError(f"Streamed label column {label_column!r} must be a ClassLabel to know the classes.")
    if not isinstance(dataset, IterableDataset):
        _check_no_missing_labels(dataset, label_column)
        _check_one_class_per_image(dataset, label_column, feature)
    if isinstance(feature, ClassLabel):
        return dataset, list(feature.names)
    if names is None:
        dataset = dataset.class_encode_column(label_column)
        return dataset, list(dataset.features[label_column].names)
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(value) for value in dataset[label_column]} - ids.keys())
    if unknown:
        raise UserError(
            f"Labels {unknown[:5]} in column {label_column!r} are not among the training classes {names[:10]}."
        )
    encoded = dataset.map(
        lambda batch: {label_column: [ids[str(value)] for value in batch[label_column]]}, batched=True
    )
    return encoded.cast_column(label_column, ClassLabel(names=names)), names


def _check_one_class_per_image(dataset, label_column: str, feature):
    """The scripts train single-label classifiers: a label is a class id or name. Lists (several labels an image) would
    fail deep inside `datasets`, and fractional numbers (a regression target?) would each become a class."""
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(CLASS_DTYPES)):
        return
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        fractional = next((value for value in dataset[label_column] if not float(value).is_integer()), None)
        if fractional is None:
            return  # whole numbers stored as floats (a pandas column with gaps, say): class ids
        found = f"fractional numbers ({fractional:g}, ...)"
    else:
        found = f"values of type {type(feature).__name__}"
    raise UserError(
        f"Column {label_column!r} holds {found}, not one class per image: the scripts train single-label "
        "classifiers on a column of class ids or names; name another with --label_column_name."
    )


def _check_no_missing_labels(dataset, label_column: str):
    """A `None` label would become a class of its own, or fail deep inside `datasets`: refused, counted."""
    missing = sum(value is None for value in dataset[label_column])
    if missing:
        raise UserError(
            f"{missing} of {len(dataset)} images of a split have no label (None) in column {label_column!r}: drop "
            "them, or pretrain on them with run_pretraining.py, which needs no labels."
        )


def encode_label_splits(train, validation, label_column: str) -> tuple:
    """Both splits with `ClassLabel` labels of train's classes, checked, and the class names."""
    train, names = encode_labels(train, label_column)
    if len(names) < 2:
        # One class would make transformers treat the task as regression (one output, an MSE loss, accuracy 1.0).
        raise UserError(
            f"The training split has {len(names)} class ({names}) in column {label_column!r}: a classifier needs at "
            "least 2 classes."
        )
    validation, validation_names = encode_labels(validation, label_column, names)
    if validation_names != names:
        raise UserError(f"The validation split's classes {validation_names[:10]} differ from train's {names[:10]}.")
    check_labels(train, label_column, names, "train")
    check_labels(validation, label_column, names, "validation")
    return train, validation, names


class LabelledSplits(NamedTuple):
    """The training and validation splits, their labels encoded as ids of train's classes (`names`)."""

    train: Dataset | IterableDataset
    validation: Dataset | IterableDataset
    image_column: str
    label_column: str
    names: list[str]


def labelled_splits(splits: dict, args: DataArguments) -> LabelledSplits:
    """The image and label columns of `load_splits`' splits (as the flags name them, or found), and both splits with
    their labels encoded and checked (`encode_label_splits`)."""
    image_column = find_image_column(splits["train"], args.image_column_name)
    if args.label_column_name is None and find_label_column(splits["train"], required=False) is None:
        _check_class_folders(args)
    label_column = find_label_column(splits["train"], args.label_column_name)
    train, validation, names = encode_label_splits(splits["train"], splits["validation"], label_column)
    return LabelledSplits(train, validation, image_column, label_column, names)


# Folders directly under an image folder that `datasets` reads as its splits, not as classes.
SPLIT_FOLDERS = ("train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval")


def _check_class_folders(args: DataArguments):
    """`datasets` labels the images of a local image folder by their subfolders only where there are at least two:
    a folder of one class, or of images in no class folder, has no label column, and no column to name."""
    flag, folder = ("--dataset_name", args.dataset_name) if args.dataset_name else ("--train_dir", args.train_dir)
    if folder is None or not os.path.isdir(folder):
        return
    classes = _class_folders(folder)
    if len(classes) >= 2:
        return
    found = f"one class folder ({classes.pop()!r})" if classes else "its images in no class folder"
    raise UserError(
        f"{flag} {folder} has {found}, so its images have no labels: a labelled image folder holds a subfolder of "
        "images for each class, at least 2."
    )


def _class_folders(folder: str) -> set[str]:
    """The names of the folders that hold `folder`'s images (the first two found), but `folder` itself and the
    split folders directly under it."""
    classes = set()
    for path, _, files in os.walk(folder):
        relative = os.path.relpath(path, folder)
        if relative == "." or (os.sep not in relative and relative.lower() in SPLIT_FOLDERS):
            continue
        if any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in files):
            classes.add(os.path.basename(path))
            if len(classes) == 2:
                break
    return classes


# The seeds numpy takes (`np.random.default_rng`, `Dataset.train_test_split`): [low, high).
SEED_RANGE = (0, 2**32)


def check_seed(flag: str, seed: int):
    """A seed in `SEED_RANGE`, refused otherwise before it ends in numpy's traceback once the data is loaded."""
    low, high = SEED_RANGE
    if not low <= seed < high:
        raise UserError(f"{flag} {seed} must be in [{low}, {high}).")


def check_labels(dataset, label_column: str, names: list[str], split: str):
    """Every label of a (not streamed) split must be one of the model's classes."""
    if isinstance(dataset, IterableDataset):
        return
    labels = np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])
    outside = sorted(set(labels[(labels < 0) | (labels >= len(names))].tolist()))
    if outside:
        raise UserError(
            f"The {split} split has label ids {outside[:5]} in column {label_column!r}, outside the {len(names)} "
            "classes of the model (-1 marks unlabelled images in some datasets): drop them or use another split."
        )


def labelled_indices(
    dataset: Dataset, label_column: str, seed: int, fraction: float | None = None, per_class: int | None = None
) -> list[int]:
    """A class-balanced subset, as sorted row indices: `round(fraction * n_c)` or `per_class` images of every class
    c, drawn with `seed` alone, so that every method and training seed sees the same labelled images."""
    labels = np.asarray(dataset.select_columns([label_column]).with_format("numpy")[label_column])
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = per_class if per_class is not None else round(fraction * len(members))
        flag = f"--labels_per_class {per_class}" if per_class is not None else f"--label_fraction {fraction}"
        if not 1 <= count <= len(members):
            raise UserError(f"{flag} asks for {count} images of class {label} but it has {len(members)}.")
        chosen.append(generator.choice(members, size=count, replace=False))
    return sorted(np.concatenate(chosen).tolist())


@dataclass
class LabelledSubsetArguments:
    label_fraction: float | None = field(
        default=None, metadata={"help": "Use this share of the labels of every class, e.g. 0.05."}
    )
    labels_per_class: int | None = field(
        default=None, metadata={"help": "Use this many labelled images of every class, e.g. 60."}
    )
    label_seed: int = field(default=0, metadata={"help": "Seed of the labelled subset, apart from --seed."})

    def __post_init__(self):
        if self.label_fraction is not None and self.labels_per_class is not None:
            raise UserError("Give --label_fraction or --labels_per_class, not both.")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise UserError(f"--label_fraction {self.label_fraction} must be in (0, 1].")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise UserError(f"--labels_per_class {self.labels_per_class} must be at least 1.")
        check_seed("--label_seed", self.label_seed)

    @property
    def selects_subset(self) -> bool:
        return self.label_fraction is not None or self.labels_per_class is not None

    def select(self, train, label_column: str) -> tuple:
        """The labelled subset of train the flags ask for and its row indices; train itself and None without
        --label_fraction or --labels_per_class."""
        if not self.selects_subset:
            return train, None
        if isinstance(train, IterableDataset):
            raise UserError("--label_fraction and --labels_per_class need the whole training split: drop --streaming.")
        indices = labelled_indices(train, label_column, self.label_seed, self.label_fraction, self.labels_per_class)
        logger.info("Labelled subset: %d images (label seed %d).", len(indices), self.label_seed)
        return train.select(indices), indices

    def describe(self) -> str:
        """The subset in words, for model cards."""
        if self.labels_per_class is not None:
            return f"{self.labels_per_class} labelled images of every class"
        if self.label_fraction is not None:
            return f"A class-balanced {self.label_fraction:.0%} (label seed {self.label_seed})"
        return "All"


class KeepOneChannel(torch.nn.Module):
    """CPC v2's colour augmentation: with probability `p`, keep one of the colour channels at random and set the
    others to zero (their mean, after normalisation)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        keep = torch.randint(image.shape[0], ())
        return image * (torch.arange(image.shape[0]) == keep).view(-1, 1, 1)


class GridAlignedResizedCrop(v2.RandomResizedCrop):
    """A random resized crop whose sides are whole multiples of the patch grid's rows and columns, so that each
    patch of the output is resampled from a whole number of source pixels, all patches at the same sub-pixel offsets.
    With any other side the offsets drift from patch to patch: the interpolation leaves a pattern that tells a patch
    where it lies, a shortcut through the patch-placing task that evaluation images (not resampled) do not offer,
    and one that a patch network with width to spare learns (docs/research-log.md)."""

    def __init__(self, size, grid: tuple[int, int], scale: tuple[float, float]):
        super().__init__(size, scale=scale)
        self.grid = grid

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        image_size = v2.functional.get_size(flat_inputs[0])
        for side, start, cells, size in zip(("height", "width"), ("top", "left"), self.grid, image_size, strict=True):
            if size >= cells:  # (an image narrower than the grid keeps its crop)
                # The nearest multiple, so that the crops keep torchvision's distribution of scales, moved back
                # inside the image where it grew past the edge.
                params[side] = min(max(cells, cells * round(params[side] / cells)), size - size % cells)
                params[start] = min(params[start], size - params[side])
        return params


class CentreCrop(torch.nn.Module):
    """The image processor's centre crop (`transformers.image_transforms.center_crop`) of a PIL image: half of each
    margin, rounded down, is cut before the crop. torchvision's `CenterCrop` rounds half a margin to the nearest
    integer, a pixel further down or right for margins of 3, 7, 11, ...; an image smaller than the crop is padded as
    torchvision pads it."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = size

    def forward(self, image: Image.Image) -> Image.Image:
        (height, width), (width_in, height_in) = self.size, image.size
        if height_in < height or width_in < width:
            return v2.functional.center_crop(image, list(self.size))
        return v2.functional.crop(image, (height_in - height) // 2, (width_in - width) // 2, height, width)


def crop_size(processor: BitImageProcessor) -> tuple[int, int]:
    """The height and width of the images that `processor` makes."""
    return processor.crop_size["height"], processor.crop_size["width"]


def evaluation_image(processor: BitImageProcessor) -> v2.Compose:
    """PIL image -> uint8 tensor as the image processor sizes it for evaluation: the shortest edge resized (with PIL,
    bilinear) and the centre cropped."""
    return v2.Compose([v2.Resize(processor.size["shortest_edge"]), CentreCrop(crop_size(processor)), v2.ToImage()])


# The share of an image that a pretraining crop keeps, at least, for small images and for the rest (see
# `image_transform`).
SMALL_IMAGE_CROP_SCALE = (0.5, 1.0)
LARGE_IMAGE_CROP_SCALE = (0.08, 1.0)


def image_transform(
    processor: BitImageProcessor,
    train: bool,
    channel_drop_prob: float = 0.0,
    patch_grid: tuple[int, int] | None = None,
    trivial_augment: bool = False,
) -> v2.Compose:
    """RGB PIL image -> normalised tensor, with the sizes and normalisation of the model's image processor.
    Training: padded random crop and flip for images up to 64 pixels, random resized crop and flip above, on uint8
    tensors (torchvision's tensor kernels resize about twice as fast as PIL: the data loader keeps up with fewer
    workers). Evaluation: resize the shortest edge (with PIL) and centre crop, as the image processor does.
    `patch_grid` (pretraining: the model's rows and columns of patches): a random resized crop for every size (of at
    least half a small image), never padding, since the padded border, reflected or blank, tells a patch at the edge
    where it lies; and aligned to the grid (`GridAlignedResizedCrop`), since unaligned resampling tells every patch
    where it lies. Both are shortcuts through the patch-placing task that evaluation images do not offer.
    `trivial_augment` (fine-tuning): TrivialAugment after the crop and flip, on the uint8 image."""
    size = crop_size(processor)
    if not train:
        steps = [evaluation_image(processor)]
    elif patch_grid is not None:
        scale = SMALL_IMAGE_CROP_SCALE if max(size) <= 64 else LARGE_IMAGE_CROP_SCALE
        steps = [v2.ToImage(), GridAlignedResizedCrop(size, patch_grid, scale), v2.RandomHorizontalFlip()]
    elif max(size) <= 64:
        crop = v2.RandomCrop(size, padding=min(size) // 8, padding_mode="reflect")
        steps = [v2.ToImage(), v2.Resize(min(size)), crop, v2.RandomHorizontalFlip()]
    else:
        steps = [v2.ToImage(), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    if train and trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(processor.image_mean, processor.image_std)]
    if train and channel_drop_prob > 0:
        steps.append(KeepOneChannel(channel_drop_prob))
    return v2.Compose(steps)


# What PIL raises for a file that is not a readable image: empty, truncated, corrupt, not an image at all, or
# a decompression bomb.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# Raw modes in which PIL decodes 16 bits per channel to 8, keeping the high byte: colour and grey-alpha PNG and TIFF,
# SGI. (One-channel 16-bit PNG and TIFF decode to the I;16 modes, which keep every bit.)
HIGH_BYTE_RAW_MODES = re.compile(r"(L|LA|RGB|RGBA|RGBa|RGBX|CMYK);16[BLN]?")


def read_image(entry: dict) -> Image.Image:
    """Decode an undecoded `datasets` image (`{"bytes", "path"}`) completely, so that a truncated file fails here,
    turn it by its EXIF orientation as `datasets` and `transformers` do, and return it as RGB, 8 bits per channel, by
    `modeling_selfie.to_rgb`, which users of a trained model read their images with. Multi-frame files (GIF, TIFF,
    animated PNG) give their first frame, as in `datasets` and `transformers`.

    An image that cannot be read so raises a `ValueError` (counted as unreadable, like a corrupt file): one that
    `to_rgb` refuses (negative, NaN or infinite values), and a colour (or grey-alpha) PNG or TIFF of 16 bits per
    channel whose values are all below 4096, 12-bit data that PIL, which keeps the high byte (the full 16-bit range,
    as in `datasets`), would read nearly black."""
    image = Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"])
    high_bytes = _decodes_high_bytes(image)  # before `load`, which drops the tiles
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    image = to_rgb(image)
    if high_bytes and max(high for _, high in image.getextrema()) < 16:
        raise ValueError("16-bit channels all below 4096 (12-bit data?), which PIL reads as nearly black")
    return image


def _decodes_high_bytes(image: Image.Image) -> bool:
    # A tile's args are its raw mode, or a tuple that starts with it (or, for some decoders, other things).
    for tile in image.tile:
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        if args and isinstance(args[0], str) and HIGH_BYTE_RAW_MODES.fullmatch(args[0]):
            return True
    return False


def image_name(entry: dict) -> str:
    return entry.get("path") or "an image embedded in the dataset"


def unreadable_note(entry: dict, error: Exception) -> str:
    """An unreadable image as runs name it: its name and why it could not be read."""
    return f"{image_name(entry)} ({type(error).__name__}: {error})"


class RandomStream:
    """A random stream of the data pipeline's own (augmentation, masks), apart from the model's: torch's CPU
    generator runs on this stream's state inside `active()`, and every example records the state after its batch.
    `SelfieTrainer` saves the state after the last batch trained on with every checkpoint, and restores it before
    a resumed run reads its first batch, so that the resumed run draws what the uninterrupted one would have
    (exactly so with `--dataloader_num_workers 0`: workers draw from copies of the stream)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.reset()

    def reset(self):
        self.state = torch.Generator().manual_seed(self.seed).get_state()

    @contextmanager
    def active(self):
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


def with_image_transform(
    dataset,
    transform,
    image_column: str,
    label_column: str | None = None,
    stream: RandomStream | None = None,
    mask_sizes: tuple[int, int] | None = None,
):
    """The dataset yielding `pixel_values` (and `labels`), transformed lazily, image by image, as it is read, on
    `stream` where given. With `mask_sizes` (`num_patches`, `num_masked_patches`), every image also gets a mask
    (`bool_masked_pos`) drawn from `stream`. An image that cannot be read yields `pixel_values=None` and its name
    in `unreadable`, for the collator to drop."""
    dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    transform_batch = TransformBatch(transform, image_column, label_column, stream, mask_sizes)
    if isinstance(dataset, IterableDataset):
        return dataset.map(transform_batch, batched=True, remove_columns=_column_names(dataset))
    return dataset.with_transform(transform_batch)


@dataclass
class TransformBatch:
    """`with_image_transform`'s transform of a batch of examples. A class, not a closure, so that DataLoader workers
    started by spawning or by a fork server (macOS, Python 3.14's default on Linux) can unpickle it."""

    transform: Callable
    image_column: str
    label_column: str | None
    stream: RandomStream | None
    mask_sizes: tuple[int, int] | None

    def __call__(self, batch: dict) -> dict:
        entries = batch[self.image_column]
        pixel_values, unreadable = [], []
        with self.stream.active() if self.stream is not None else nullcontext():
            for entry in entries:
                try:
                    pixel_values.append(self.transform(read_image(entry)))
                    unreadable.append(None)
                except UNREADABLE_IMAGE_ERRORS as error:
                    pixel_values.append(None)
                    unreadable.append(unreadable_note(entry, error))
            result = {"pixel_values": pixel_values, "unreadable": unreadable}
            if self.mask_sizes is not None:
                result["bool_masked_pos"] = list(random_patch_mask(len(entries), *self.mask_sizes))
        if self.stream is not None:
            result["stream_state"] = [self.stream.state] * len(entries)
        if self.label_column is not None:
            result["labels"] = batch[self.label_column]
        return result


def collate_images(examples: list[dict]) -> dict:
    """Stack the readable images (and their labels and masks). `unreadable_images` names the others, and
    `data_stream_state` is the data stream's state after this batch; `SelfieTrainer` takes both out of the batch.
    A batch none of whose images could be read has empty `pixel_values` and no labels or masks: the trainer skips
    it, where raising here would stop the run."""
    readable = [example for example in examples if example["pixel_values"] is not None]
    batch = _stack(readable) if readable else {"pixel_values": torch.empty(0)}
    batch["unreadable_images"] = [example["unreadable"] for example in examples if example["pixel_values"] is None]
    batch["data_stream_state"] = examples[-1].get("stream_state")
    return batch


def _stack(examples: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([example["labels"] for example in examples])
    if "bool_masked_pos" in examples[0]:
        batch["bool_masked_pos"] = torch.stack([example["bool_masked_pos"] for example in examples])
    return batch


def choose_preset(args: DataArguments, train, image_column: str) -> str:
    """--preset, or the obvious one: cifar10 for CIFAR datasets, else by the size of the first training image."""
    if args.preset is not None:
        return args.preset
    if "cifar" in (args.dataset_name or "").lower():
        name = "cifar10"
    else:
        width, height = _first_readable_image(train, image_column).size
        name = "imagenet32" if max(width, height) <= 64 else "imagenet224"
    logger.info("Using the %s preset (choose another with --preset).", name)
    return name


def _first_readable_image(dataset, image_column: str, tries: int = 100) -> Image.Image:
    entries = dataset.cast_column(image_column, ImageFeature(decode=False))
    for entry in itertools.islice(entries, tries):
        try:
            return read_image(entry[image_column])
        except UNREADABLE_IMAGE_ERRORS:
            continue
    raise UserError(f"None of the first {tries} images of the training split could be read.")
