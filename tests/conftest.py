"""Fixtures of the whole suite; the helpers that tests import are in `tests/utils.py`."""

from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

from selfie_training import hub
from tests.utils import class_images, pretrain


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test reaches the Hub: each runs in offline mode (a test of the Hub's answers simulates them, offline mode
    off), and what a run does to the process's offline mode (`selfie_training.hub`) is undone after it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_offline_reason", None)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An imagefolder of 3 classes x 12 PNGs, in class subfolders."""
    root = tmp_path / "imagefolder"
    for index, (image, label) in enumerate(class_images(3, 12)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class_{label}" / f"{index}.png")
    return root


@pytest.fixture
def parquet_folder(tmp_path) -> Path:
    """A parquet file with an `img` Image column and a `label` ClassLabel column, as the Hub's CIFAR-10 has."""
    images, labels = zip(*class_images(6, 8, size=(32, 32)), strict=True)
    features = Features({"img": ImageFeature(), "label": ClassLabel(names=[f"c{i}" for i in range(6)])})
    root = tmp_path / "parquet"
    root.mkdir()
    Dataset.from_dict({"img": list(images), "label": list(labels)}, features=features).to_parquet(
        root / "train.parquet"
    )
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny pretraining checkpoint (1 step on the digits), shared by a module's tests."""
    output = tmp_path_factory.mktemp("pretrained")
    pretrain(output, "--max_steps", "1", "--per_device_train_batch_size", "8", "--max_train_samples", "64",
             "--max_eval_samples", "16")  # fmt: skip
    return output
