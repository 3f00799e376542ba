import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from torchvision.transforms import v2

from modeling_selfie import preset_image_processor
from selfie_training.data import (
    SMALL_IMAGE_CROP_SCALE,
    DataArguments,
    GridAlignedResizedCrop,
    KeepOneChannel,
    RandomStream,
    check_labels,
    choose_preset,
    collate_images,
    digits_dataset,
    encode_labels,
    find_image_column,
    find_label_column,
    image_transform,
    labelled_indices,
    load_splits,
    with_image_transform,
)
from selfie_training.metrics import TopKAccuracy, image_candidate_hits, top_classes
from tests.utils import class_images


def labelled_dataset(counts: dict[int, int]) -> Dataset:
    labels = [label for label, count in counts.items() for _ in range(count)]
    np.random.default_rng(0).shuffle(labels)
    features = Features({"label": ClassLabel(num_classes=len(counts)), "id": Value("int64")})
    return Dataset.from_dict({"label": labels, "id": list(range(len(labels)))}, features=features)


def class_counts(dataset: Dataset, indices: list[int]) -> dict[int, int]:
    labels = dataset.select(indices)["label"]
    return {label: labels.count(label) for label in sorted(set(labels))}


def test_label_fraction_takes_that_share_of_every_class():
    dataset = labelled_dataset({0: 20, 1: 40, 2: 60})
    assert class_counts(dataset, labelled_indices(dataset, "label", seed=0, fraction=0.1)) == {0: 2, 1: 4, 2: 6}
    assert class_counts(dataset, labelled_indices(dataset, "label", seed=0, fraction=0.25)) == {0: 5, 1: 10, 2: 15}


def test_labels_per_class_takes_that_many_of_every_class():
    dataset = labelled_dataset({0: 20, 1: 40, 2: 60})
    indices = labelled_indices(dataset, "label", seed=3, per_class=7)
    assert class_counts(dataset, indices) == {0: 7, 1: 7, 2: 7}
    assert indices == sorted(set(indices))


def test_labelled_subset_depends_on_its_seed_alone():
    dataset = labelled_dataset({0: 50, 1: 50})
    first = labelled_indices(dataset, "label", seed=5, fraction=0.2)
    torch.manual_seed(123)  # the training seed moves the global generators ...
    np.random.seed(123)
    assert labelled_indices(dataset, "label", seed=5, fraction=0.2) == first  # ... not the subset
    assert labelled_indices(dataset, "label", seed=6, fraction=0.2) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.01}, r"--label_fraction 0.01 asks for 0 images of class"),
        ({"per_class": 30}, r"--labels_per_class 30 asks for 30 images of class 0 but it has 20"),
    ],
)
def test_impossible_subsets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        labelled_indices(labelled_dataset({0: 20, 1: 40}), "label", seed=0, **kwargs)


def test_columns_are_detected_or_named():
    features = Features({"img": Value("string"), "fine_label": Value("int64"), "coarse": Value("int64")})
    dataset = Dataset.from_dict({"img": ["a"], "fine_label": [1], "coarse": [0]}, features=features)
    assert find_image_column(dataset) == "img"
    assert find_label_column(dataset) == "fine_label"
    assert find_label_column(dataset, "coarse") == "coarse"
    with pytest.raises(
        ValueError,
        match=r"--label_column_name 'species' is not a column of the dataset; its columns are \['img', 'fine_label', 'coarse'\]",
    ):
        find_label_column(dataset, "species")
    unlabelled = Dataset.from_dict({"picture": ["a"]})
    with pytest.raises(ValueError, match=r"No image column found among the dataset's columns \['picture'\]"):
        find_image_column(unlabelled)
    assert find_label_column(unlabelled, required=False) is None


def test_integer_labels_become_classes_and_other_splits_follow_train():
    train, names = encode_labels(Dataset.from_dict({"label": [3, 1, 3, 7]}), "label")
    assert names == ["1", "3", "7"]
    assert list(train["label"]) == [1, 0, 1, 2]
    validation, validation_names = encode_labels(Dataset.from_dict({"label": [7, 7, 3]}), "label", names)
    assert validation_names == names and list(validation["label"]) == [2, 2, 1]
    with pytest.raises(ValueError, match=r"Labels \['9'\] in column 'label' are not among the training classes"):
        encode_labels(Dataset.from_dict({"label": [9, 3]}), "label", names)


def test_labels_outside_the_classes_are_refused():
    dataset = Dataset.from_dict({"label": [0, 2, -1]}, features=Features({"label": ClassLabel(num_classes=3)}))
    with pytest.raises(
        ValueError, match=r"The validation split has label ids \[-1\] in column 'label', outside the 3 classes"
    ):
        check_labels(dataset, "label", ["a", "b", "c"], "validation")
    check_labels(dataset.select([0, 1]), "label", ["a", "b", "c"], "validation")


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16"])
@pytest.mark.parametrize("train", [True, False])
def test_images_of_any_mode_and_size_become_normalised_rgb_tensors(mode, train):
    processor = preset_image_processor("cifar10")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert(mode)
    dataset = Dataset.from_dict({"image": [image]}).cast_column("image", ImageFeature())
    dataset = with_image_transform(dataset, image_transform(processor, train), "image")
    pixel_values = dataset[0]["pixel_values"]
    assert pixel_values.shape == (3, 32, 32) and pixel_values.dtype == torch.float32
    assert -3 < pixel_values.mean() < 3


# Resized to 256 x 341, 259 x 256 and 256 x 259: margins of 117 and 35 pixels, whose halves torchvision's CenterCrop
# rounds to 58 and 18, and the image processor to 58 and 17.
@pytest.mark.parametrize("height_width", [(300, 400), (304, 300), (300, 304)])
def test_evaluation_transform_matches_the_image_processor(height_width):
    processor = preset_image_processor("imagenet224")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (*height_width, 3), dtype=np.uint8))
    ours = image_transform(processor, train=False)(image)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0)  # the same resize, crop and normalisation


def step_names(transform) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]


def test_training_transform_for_224_is_random_resized_crop():
    processor = preset_image_processor("imagenet224")
    transform = image_transform(processor, train=True, channel_drop_prob=0.5)
    names = step_names(transform)
    assert names[:3] == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip"] and names[-1] == "KeepOneChannel"
    image = Image.new("RGB", (120, 90))
    assert transform(image).shape == (3, 224, 224)


def test_trivial_augment_follows_the_crop_and_flip_of_training_images_only():
    processor = preset_image_processor("cifar10")
    augmented = image_transform(processor, train=True, trivial_augment=True)
    plain = image_transform(processor, train=True)
    assert step_names(augmented)[-4:-2] == ["RandomHorizontalFlip", "TrivialAugmentWide"]  # uint8, before scaling
    assert "TrivialAugmentWide" not in step_names(plain)
    assert "TrivialAugmentWide" not in step_names(image_transform(processor, train=False, trivial_augment=True))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    changed = 0
    for seed in range(20):  # the same crop and flip (the same draws come first), then an operation or not
        torch.manual_seed(seed)
        ours = augmented(image)
        torch.manual_seed(seed)
        changed += not torch.equal(ours, plain(image))
    assert changed >= 10  # most draws change the image ("identity" is one operation of 14, and weak ones round off)


def test_keep_one_channel_keeps_one_channel():
    torch.manual_seed(0)
    image = torch.randn(3, 8, 8)
    always = KeepOneChannel(1.0)
    kept = [int((always(image).abs().sum(dim=(1, 2)) > 0).sum()) for _ in range(20)]
    assert kept == [1] * 20
    assert torch.equal(KeepOneChannel(0.0)(image), image)


def masked_images(seed: int, batches: int = 2) -> list[torch.Tensor]:
    """The masks of `batches` batches of 8 images, transformed on a stream seeded with `seed`."""
    images = Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 8}).cast_column("image", ImageFeature())
    transform = image_transform(preset_image_processor("cifar10"), train=True)
    dataset = with_image_transform(images, transform, "image", stream=RandomStream(seed), mask_sizes=(16, 4))
    return [collate_images([dataset[i] for i in range(8)])["bool_masked_pos"] for _ in range(batches)]


def test_masks_are_drawn_per_image_from_the_data_stream():
    first, second = masked_images(seed=7)
    assert first.shape == (8, 16) and first.sum(dim=1).tolist() == [4] * 8
    assert len({tuple(row.tolist()) for row in first}) > 1  # every image its own mask
    assert not torch.equal(first, second)  # every batch new masks
    torch.manual_seed(123)  # the model's generator does not move the data stream
    assert all(torch.equal(a, b) for a, b in zip(masked_images(seed=7), (first, second), strict=True))
    assert not torch.equal(masked_images(seed=8)[0], first)


def test_random_stream_leaves_the_global_generator_alone():
    stream = RandomStream(seed=0)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with stream.active():
        drawn = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with RandomStream(seed=0).active():
        assert torch.equal(torch.rand(3), drawn)


def test_default_dataset_is_the_embedded_digits():
    digits = digits_dataset()["train"]
    assert len(digits) == 1797
    assert digits.features["label"].names == [str(d) for d in range(10)]
    assert digits[0]["image"].size == (32, 32) and digits[0]["image"].mode == "RGB"
    args = DataArguments()
    splits = load_splits(args)
    assert (len(splits["train"]), len(splits["validation"])) == (1617, 180)
    assert args.evaluation_split == "train"  # held out from it, for the model card
    assert choose_preset(DataArguments(), splits["train"], "image") == "imagenet32"


def test_validation_carve_is_stratified_and_fixed_by_the_split_seed():
    first = load_splits(DataArguments(split_seed=0))["validation"]["label"]
    assert load_splits(DataArguments(split_seed=0))["validation"]["label"] == first
    assert load_splits(DataArguments(split_seed=1))["validation"]["label"] != first
    counts = np.bincount(first, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # 10% of every digit's ~180 images


def test_preset_is_inferred_where_obvious(parquet_folder):
    assert choose_preset(DataArguments(dataset_name="uoft-cs/cifar10"), None, "img") == "cifar10"
    train = load_splits(DataArguments(dataset_name=str(parquet_folder)))["train"]
    assert choose_preset(DataArguments(dataset_name=str(parquet_folder)), train, "img") == "imagenet32"
    big = Dataset.from_dict({"image": [Image.new("RGB", (256, 200))]})
    assert choose_preset(DataArguments(), big, "image") == "imagenet224"
    assert choose_preset(DataArguments(preset="cifar10"), big, "image") == "cifar10"


def test_streaming_holds_out_the_first_images_for_validation(parquet_folder):
    splits = load_splits(DataArguments(dataset_name=str(parquet_folder), streaming=True, max_eval_samples=10))
    assert len(list(splits["validation"])) == 10
    assert len(list(splits["train"])) == 38


def test_top_k_accuracy_metric():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0, 0, 0], [0.8, 0.1, 0.05, 0, 0, 0], [-1, 0, 0.1, 0.2, 0.3, 0.4]])
    top = top_classes(logits, None)
    assert top.shape == (3, 5) and top[:, 0].tolist() == [1, 0, 5]
    result = TopKAccuracy(keep_in_memory=True).compute(predictions=top, references=[1, 2, 0])
    assert result == {"accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}
    assert top_classes(logits[:, :4], None).shape == (3, 1)  # 5 classes or fewer: top-1 only


def test_candidate_hits_counts_own_patch_wins():
    logits = torch.tensor([[[2.0, 1.0], [0.0, 3.0]], [[0.0, 1.0], [0.0, 3.0]]])  # image 0: 2 of 2, image 1: 1 of 2
    assert image_candidate_hits(logits, None).tolist() == [1.0, 0.5]
    # With the split objective Trainer keeps `logits` and `reverse_logits`: every position of both counts.
    reverse_logits = torch.tensor([[[0.0, 1.0], [0.0, 3.0]], [[0.0, 1.0], [2.0, 1.0]]])  # 1 of 2, then 0 of 2
    assert image_candidate_hits((logits, reverse_logits), None).tolist() == [0.75, 0.25]


def test_accuracy_metric_works_offline(tmp_path):
    script = textwrap.dedent(
        """
        from selfie_training.metrics import TopKAccuracy
        print(TopKAccuracy(keep_in_memory=True).compute(predictions=[[1, 0], [2, 1], [0, 2]], references=[1, 1, 1]))
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("{'accuracy': 0.3333333333333333, 'top2_accuracy': 0.6666666666666666}")


def test_pretraining_crops_of_small_images_add_no_border():
    """A horizontal ramp stays monotonic along every row under a borderless crop (resized, maybe flipped); a padded
    crop would add a border (reflected or blank) that tells edge patches where they lie."""
    processor = preset_image_processor("cifar10")
    ramp = Image.fromarray(
        np.repeat(np.linspace(0, 255, 32)[None, :, None], 32, axis=0).repeat(3, axis=2).astype(np.uint8)
    )
    borderless = image_transform(processor, train=True, patch_grid=(4, 4))
    padded = image_transform(processor, train=True)
    torch.manual_seed(0)

    def monotonic_rows(tensor: torch.Tensor) -> bool:
        steps = tensor[0].diff(dim=1)
        return bool((steps >= -1e-5).all() or (steps <= 1e-5).all())

    assert all(monotonic_rows(borderless(ramp)) for _ in range(50))
    assert not all(monotonic_rows(padded(ramp)) for _ in range(50))


def patch_offsets(crop: v2.RandomResizedCrop, patch: int) -> list[torch.Tensor]:
    """For one draw of `crop` on a 32x32 horizontal ramp (each pixel's value its column), the column each output
    pixel was interpolated at, less that of the same pixel of the first patch: whole numbers exactly where every
    patch is resampled at the same sub-pixel offsets. Bilinear upsampling reproduces a ramp exactly; the first and
    last pixels of the image, clamped at the crop's edge, are left out."""
    ramp = torch.arange(32.0).expand(1, 32, 32)
    columns = crop(ramp)[0, 0]
    first = columns[1 : patch - 1]
    return [columns[k * patch + 1 : (k + 1) * patch - 1] - first for k in range(1, 32 // patch)]


def test_pretraining_crops_resample_every_patch_at_the_same_offsets():
    """Sides that are multiples of the grid's 4 cells put every 8-pixel patch on the same sub-pixel offsets, so the
    interpolation cannot tell a patch where it lies; torchvision's crop with any side drifts them."""
    torch.manual_seed(0)
    aligned = GridAlignedResizedCrop(32, (4, 4), SMALL_IMAGE_CROP_SCALE)
    plain = v2.RandomResizedCrop(32, scale=SMALL_IMAGE_CROP_SCALE)

    def whole(offsets: list[torch.Tensor]) -> bool:
        return all(torch.allclose(o, o.round(), atol=1e-4) for o in offsets)

    draws = {
        name: [crop.make_params([torch.zeros(3, 32, 32)]) for _ in range(2000)]
        for name, crop in (("aligned", aligned), ("plain", plain))
    }
    assert all(params["height"] % 4 == params["width"] % 4 == 0 for params in draws["aligned"])
    assert len({params["width"] for params in draws["aligned"]}) > 1
    for params in draws["aligned"] + draws["plain"]:
        assert params["top"] + params["height"] <= 32 and params["left"] + params["width"] <= 32
    # Sides rounded to the nearest multiple: the crops keep the plain crop's scales, on average within 2%.
    area = {name: np.mean([p["height"] * p["width"] for p in params]) for name, params in draws.items()}
    assert area["aligned"] == pytest.approx(area["plain"], rel=0.02)
    assert all(whole(patch_offsets(aligned, 8)) for _ in range(50))
    assert not all(whole(patch_offsets(plain, 8)) for _ in range(50))


@pytest.mark.parametrize(
    ("names", "evaluated"), [(["train", "test"], "test"), (["train", "validation", "test"], "validation")]
)
def test_the_split_evaluated_on_is_recorded(tmp_path, names, evaluated):
    images, labels = zip(*class_images(2, 4, size=(32, 32)), strict=True)
    for name in names:
        Dataset.from_dict({"image": list(images), "label": list(labels)}).to_parquet(tmp_path / f"{name}.parquet")
    args = DataArguments(dataset_name=str(tmp_path))
    load_splits(args)
    assert args.evaluation_split == evaluated
