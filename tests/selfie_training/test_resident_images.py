"""Resident images: batches augmented on the device as `image_transform` augments each image (the same crops, flips,
pixels and normalisation, over many seeded draws), the choice of that path, and runs on it."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2
from transformers import TrainingArguments

from modeling_selfie import preset_image_processor
from selfie_training.batched_augmentation import (
    Normalize,
    PaddedRandomCrops,
    RandomResizedCrops,
    random_flips,
    random_offsets,
    resized_crop_params,
)
from selfie_training.data import (
    LARGE_IMAGE_CROP_SCALE,
    SMALL_IMAGE_CROP_SCALE,
    DataArguments,
    GridAlignedResizedCrop,
    collate_images,
    image_transform,
)
from selfie_training.resident_images import DeviceStream, ImageSplits, ResidentImages, image_pipeline, take_batch
from tests.selfie_training.test_bad_images import write_bad_files
from tests.utils import TINY_MODEL_FLAGS, class_images, fine_tune, pretrain


DRAWS = 20_000
# Two samples of 20,000 draws from one distribution differ by a Kolmogorov-Smirnov distance above 0.025 with
# probability below 1e-5 (for discrete values, less still); the seeds are fixed besides.
KS_MARGIN = 0.025


def ks_distance(first: np.ndarray, second: np.ndarray) -> float:
    """The largest difference between the empirical distribution functions of two samples."""
    values = np.union1d(first, second)
    cdf = [np.searchsorted(np.sort(sample), values, side="right") / len(sample) for sample in (first, second)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def torchvision_crops(image_size: tuple[int, int], scale, grid) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    crop = GridAlignedResizedCrop(32, grid, scale)
    draws = [crop.make_params([torch.zeros(3, *image_size)]) for _ in range(DRAWS)]
    return {name: np.array([params[name] for params in draws]) for name in ("top", "left", "height", "width")}


def batched_crops(image_size: tuple[int, int], scale, grid) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    drawn = resized_crop_params(DRAWS, image_size, scale, grid, generator)
    return {name: tensor.numpy() for name, tensor in zip(("top", "left", "height", "width"), drawn, strict=True)}


@pytest.mark.parametrize(
    ("image_size", "scale", "grid"),
    [
        ((32, 32), SMALL_IMAGE_CROP_SCALE, (4, 4)),  # pretraining on CIFAR-10 and the digits
        ((36, 42), SMALL_IMAGE_CROP_SCALE, (4, 4)),  # sides that the grid does not divide
        ((80, 120), LARGE_IMAGE_CROP_SCALE, (1, 1)),  # fine-tuning's RandomResizedCrop
        ((16, 96), LARGE_IMAGE_CROP_SCALE, (1, 1)),  # a third of the draws fall back to the centre crop
    ],
)
def test_batched_crops_are_drawn_as_torchvision_draws_them(image_size, scale, grid):
    expected, drawn = torchvision_crops(image_size, scale, grid), batched_crops(image_size, scale, grid)
    statistics = {
        **{name: lambda crops, name=name: crops[name] for name in drawn},
        "area": lambda crops: crops["height"] * crops["width"],
        "aspect ratio": lambda crops: crops["width"] / crops["height"],
        "bottom": lambda crops: crops["top"] + crops["height"],
    }
    for name, statistic in statistics.items():
        assert ks_distance(statistic(drawn), statistic(expected)) < KS_MARGIN, name
    for side, start, cells, size in zip(("height", "width"), ("top", "left"), grid, image_size, strict=True):
        assert (drawn[side] % cells == 0).all() and (drawn[side] > 0).all()
        assert (drawn[start] >= 0).all() and (drawn[start] + drawn[side] <= size).all()


def test_padded_crops_and_flips_are_drawn_as_torchvision_draws_them():
    torch.manual_seed(0)
    crop, flip = v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()
    expected = np.array([crop.make_params([torch.zeros(3, 32, 32)])["top"] for _ in range(DRAWS)])
    pair = torch.tensor([[[0.0, 1.0]]])
    flipped = np.mean([flip(pair)[0, 0, 0].item() == 1 for _ in range(DRAWS)])
    generator = torch.Generator().manual_seed(0)
    drawn = random_offsets(40 - 32 + 1, DRAWS, generator, None).numpy()
    assert ks_distance(drawn, expected) < KS_MARGIN and set(drawn) == set(range(9))
    # Each image flipped with probability 1/2: 20,000 draws stay within 0.02 of it (over 5 standard deviations).
    assert abs(random_flips(DRAWS, generator, None).float().mean().item() - 0.5) < 0.02
    assert abs(flipped - 0.5) < 0.02


def reference_crops(images: torch.Tensor, seed: int, size, scale, grid) -> torch.Tensor:
    """Each image cropped, resized and flipped by torchvision's kernels, with the parameters that
    `RandomResizedCrops` draws from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    top, left, height, width = resized_crop_params(len(images), images.shape[2:], scale, grid, generator)
    flips = random_flips(len(images), generator, None)
    crops = []
    for image, *params, flip in zip(images, top, left, height, width, flips, strict=True):
        crop = v2.functional.resized_crop(image, *map(int, params), list(size), antialias=True)
        crops.append(v2.functional.horizontal_flip(crop) if flip else crop)
    return torch.stack(crops)


@pytest.mark.parametrize(
    ("image_size", "size", "scale", "grid"),
    [
        ((32, 32), (32, 32), SMALL_IMAGE_CROP_SCALE, (4, 4)),  # enlarged crops
        ((64, 48), (32, 32), SMALL_IMAGE_CROP_SCALE, (4, 4)),  # shrunk ones, antialiased
        ((96, 80), (224, 224), LARGE_IMAGE_CROP_SCALE, (1, 1)),
    ],
)
def test_batched_crops_have_the_pixels_of_torchvision_resized_crops(image_size, size, scale, grid):
    images = torch.randint(0, 256, (16, 3, *image_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batched = RandomResizedCrops(size, scale, grid)(images, torch.Generator().manual_seed(2))
    assert batched.shape == (16, 3, *size)
    # torch's float kernel, to rounding; its uint8 kernel (the per-image transform's), within a level: it rounds to
    # whole levels between its two passes and after them, with weights in fixed point.
    torch.testing.assert_close(batched, reference_crops(images.float(), 2, size, scale, grid), atol=1e-3, rtol=0)
    assert (batched - reference_crops(images, 2, size, scale, grid).float()).abs().max() < 1.01


def test_padded_crops_have_the_pixels_of_torchvision_padded_crops():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batched = PaddedRandomCrops((32, 32), 4)(images, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    tops, lefts = (random_offsets(9, 16, generator, None) for _ in range(2))
    flips = random_flips(16, generator, None)
    for image, top, left, flip, crop in zip(images, tops, lefts, flips, batched, strict=True):
        expected = v2.functional.crop(
            v2.functional.pad(image, [4], padding_mode="reflect"), int(top), int(left), 32, 32
        )
        expected = v2.functional.horizontal_flip(expected) if flip else expected
        assert torch.equal(crop, expected.float())
    assert flips.any() and not flips.all()


def test_normalisation_is_the_transforms():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(images))
    torch.testing.assert_close(Normalize(mean, std, torch.device("cpu"))(images), expected)


def test_device_stream_state_comes_back_as_bytes():
    stream = DeviceStream(seed=3, device=torch.device("cpu"))
    state = stream.state
    first = torch.rand(4, generator=stream.generator)
    assert isinstance(state, bytes) and not torch.equal(torch.rand(4, generator=stream.generator), first)
    stream.state = state
    assert torch.equal(torch.rand(4, generator=stream.generator), first)
    stream.reset()
    assert torch.equal(torch.rand(4, generator=stream.generator), first)


def labelled(size=(40, 36), count: int = 12, seed: int = 0) -> Dataset:
    images, labels = zip(*class_images(3, count // 3, size=size, seed=seed), strict=True)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features)


def pipeline(tmp_path, train: Dataset, data_args: DataArguments | None = None, **kwargs) -> dict:
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to="none", do_train=True)
    processor = preset_image_processor("imagenet32")
    data_args = data_args or DataArguments()
    splits = ImageSplits(train, labelled(seed=1), "image", processor, "label", **kwargs)
    return image_pipeline(splits, data_args, training_args)


def test_evaluation_batches_are_those_of_the_evaluation_transform(tmp_path):
    data = pipeline(tmp_path, labelled())
    assert isinstance(data["eval_dataset"], ResidentImages) and data["data_collator"] is take_batch
    batch = data["eval_dataset"].__getitems__([4, 0, 7])
    validation = labelled(seed=1)
    transform = image_transform(preset_image_processor("imagenet32"), train=False)
    expected = torch.stack([transform(validation[index]["image"]) for index in (4, 0, 7)])
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["labels"].tolist() == [validation[index]["label"] for index in (4, 0, 7)]


def test_training_batches_are_drawn_from_the_data_stream(tmp_path):
    data = pipeline(tmp_path, labelled(), patch_grid=(4, 4), mask_sizes=(16, 4))
    train, stream = data["train_dataset"], data["data_stream"]
    first = train.__getitems__([0, 1, 2, 3])
    assert first["pixel_values"].shape == (4, 3, 32, 32) and first["bool_masked_pos"].sum(dim=1).tolist() == [4] * 4
    assert first["data_stream_state"] == stream.state  # the state after the batch, as bytes
    second = train.__getitems__([0, 1, 2, 3])
    assert not torch.equal(first["pixel_values"], second["pixel_values"])
    stream.state = first["data_stream_state"]  # as a resumed run restores it
    again = train.__getitems__([0, 1, 2, 3])
    assert all(torch.equal(again[name], second[name]) for name in ("pixel_values", "bool_masked_pos"))


def two_sizes() -> Dataset:
    return Dataset.from_dict({"image": [Image.new("RGB", (40, 36)), Image.new("RGB", (36, 40))], "label": [0, 1]})


@pytest.mark.parametrize(
    ("train", "flags", "reason"),
    [
        (labelled, {"resident_images": False}, "--resident_images False"),
        (labelled, {"channel_drop_prob": 0.5}, "--channel_drop_prob transforms images one by one"),
        (labelled, {"trivial_augment": True}, "--trivial_augment transforms images one by one"),
        (two_sizes, {}, "its training images differ in size"),
        (lambda: labelled().to_iterable_dataset(), {}, "--streaming reads the images as they come"),
    ],
)
def test_the_per_image_path_is_taken_where_it_must_be_and_says_why(tmp_path, caplog, train, flags, reason):
    trivial_augment = flags.pop("trivial_augment", False)
    with caplog.at_level(logging.INFO, logger="selfie_training.resident_images"):
        data = pipeline(tmp_path, train(), DataArguments(**flags), trivial_augment=trivial_augment)
    assert data["data_collator"] is collate_images
    assert f"Images decoded and transformed one by one in DataLoader workers: {reason}" in caplog.text


def test_a_fine_tuning_run_on_resident_images_resumes_drawing_what_the_uninterrupted_run_draws(tmp_path, caplog):
    flags = [*TINY_MODEL_FLAGS, "--max_train_samples", "48", "--max_eval_samples", "16",
             "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "2"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="selfie_training.resident_images"):
        uninterrupted = fine_tune(tmp_path / "uninterrupted", *flags)
    assert "Images resident on cpu" in caplog.text
    # A run killed after its checkpoint-2, run again:
    shutil.copytree(tmp_path / "uninterrupted" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = fine_tune(tmp_path / "resumed", *flags)
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["global_step"] == 4
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "resumed" / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name
    assert resumed["eval_loss"] == uninterrupted["eval_loss"]


def test_unreadable_images_are_named_at_load(tmp_path):
    """All of them, each once, before the first step (the per-image path names them as its batches reach them)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (image, _) in enumerate(class_images(2, 12, size=(40, 36))):
        image.save(folder / f"good_{index}.png")
    bad = write_bad_files(folder)
    output = tmp_path / "run"
    metrics = pretrain(output, "--train_dir", str(folder), "--max_steps", "1", "--per_device_train_batch_size", "8")
    assert metrics["eval_loss"] > 0
    named = (output / "unreadable_images.txt").read_text().splitlines()
    assert {line.split(" (")[0].rsplit("/", 1)[-1] for line in named} == bad and len(named) == len(bad)
