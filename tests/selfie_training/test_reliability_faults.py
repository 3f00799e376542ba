"""Faults of the machine and data sets that would otherwise be found late or silently: a full disk while saving, a
read-only --output_dir, labels that cannot make a classifier, and data sets named or streamed in ways that leave a
split empty."""

import errno
import json
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from safetensors import SafetensorError

from selfie_training import runner
from selfie_training.data import DataArguments, encode_labels, load_splits
from selfie_training.errors import TrainingStopped
from selfie_training.trainer import _is_disk_full
from tests.utils import TINY_MODEL_FLAGS, class_images, fine_tune, last_checkpoint, pretrain


def labelled_parquet(folder: Path, labels: list) -> Path:
    """A parquet data set of `len(labels)` images with an integer (not ClassLabel) label column."""
    images = [image for image, _ in class_images(1, len(labels), size=(32, 32))]
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    folder.mkdir()
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(folder / "train.parquet")
    return folder


def test_a_single_class_is_refused_not_made_a_regression(tmp_path):
    data = labelled_parquet(tmp_path / "data", [3] * 20)
    with pytest.raises(ValueError, match=r"^The training split has 1 class \(\['3'\]\) .*needs at least 2 classes"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--dataset_name", str(data), "--max_steps", "1")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_missing_labels_are_refused_and_counted(tmp_path):
    data = labelled_parquet(tmp_path / "data", [0, 1, 0, None, 1, None, 0, 1] * 3)
    with pytest.raises(ValueError, match=r"^\d+ of \d+ images of a split have no label \(None\) in column 'label'"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--dataset_name", str(data), "--max_steps", "1")


@pytest.mark.parametrize(
    ("labels", "feature", "found"),
    [
        ([[0, 1], [1], [0], [1, 0]] * 2, List(Value("int64")), "values of type List"),  # several labels an image
        ([0.5, 1.0, 2.5, 1.0] * 2, Value("float64"), r"fractional numbers \(0\.5, \.\.\.\)"),  # a regression target?
    ],
)
def test_labels_that_are_not_one_class_an_image_are_refused_naming_the_column(labels, feature, found):
    dataset = Dataset.from_dict({"label": labels}, features=Features({"label": feature}))
    with pytest.raises(ValueError, match=rf"^Column 'label' holds {found}, not one class per image"):
        encode_labels(dataset, "label")


def test_whole_numbers_stored_as_floats_are_class_ids():
    dataset = Dataset.from_dict({"label": [0.0, 2.0, 1.0, 2.0]}, features=Features({"label": Value("float32")}))
    encoded, names = encode_labels(dataset, "label")
    assert names == ["0.0", "1.0", "2.0"] and encoded["label"] == [0, 2, 1, 2]


@pytest.mark.parametrize("script", [pretrain, fine_tune])
def test_a_read_only_output_dir_is_refused_before_training(tmp_path, monkeypatch, script):
    # The tests may run as root, whom file permissions do not stop: the folder refuses files as a read-only one would.
    output = tmp_path / "run"
    output.mkdir()
    temporary_file = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == output:
            raise PermissionError(errno.EACCES, "Permission denied")
        return temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(runner.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=rf"^--output_dir {output} cannot be written: Permission denied\.$"):
        script(output, *TINY_MODEL_FLAGS, "--max_steps", "1")
    assert list(output.iterdir()) == []  # refused before anything was written or trained


def test_a_full_disk_while_saving_stops_in_one_line_and_keeps_the_checkpoint_before(tmp_path, monkeypatch):
    output = tmp_path / "run"
    flags = ["--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "8", "--max_train_samples", "32",
             "--max_eval_samples", "16"]  # fmt: skip
    save = torch.save

    def full_disk_from_step_2(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):  # as torch's zip writer reports ENOSPC, after writing part of the file
            Path(path).write_bytes(b"PK\x03\x04")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_from_step_2)
    with pytest.raises(
        TrainingStopped,
        match=rf"^No space left on the device of {output} while saving; the checkpoints saved before are intact",
    ) as stopped:
        pretrain(output, *flags)
    assert stopped.value.exit_status == 2
    monkeypatch.setattr(torch, "save", save)
    # The half-written checkpoint-2 is skipped; the rerun resumes from checkpoint-1 and ends where it should.
    assert last_checkpoint(output) == str(output / "checkpoint-1")
    pretrain(output, *flags)
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64"),
    ],
)
def test_disk_full_is_recognised_in_each_form_and_other_errors_are_not(error):
    if "unexpected pos" in str(error):  # torch's writer, when the cause is not said: found through the cause it wraps
        error.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert _is_disk_full(error)
    assert not _is_disk_full(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64"))
    assert not _is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_stream_with_no_more_images_than_held_out_says_so(parquet_folder):
    # 48 images, all of which the default hold-out of a stream without a validation split takes for validation.
    args = DataArguments(dataset_name=str(parquet_folder), streaming=True, max_eval_samples=100)
    with pytest.raises(
        ValueError,
        match=r"^The train split of the dataset is empty: the stream holds no more images than the 100 held out",
    ):
        load_splits(args)
    assert (
        len(
            list(
                load_splits(DataArguments(dataset_name=str(parquet_folder), streaming=True, max_eval_samples=40))[
                    "train"
                ]
            )
        )
        == 8
    )


def test_a_dataset_name_may_be_a_single_data_file(parquet_folder, tmp_path):
    splits = load_splits(DataArguments(dataset_name=str(parquet_folder / "train.parquet"), train_val_split=0.25))
    assert (len(splits["train"]), len(splits["validation"])) == (36, 12)
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(
        ValueError, match=r"^--dataset_name \S+images.zip is a file: give the folder that holds the data"
    ):
        load_splits(DataArguments(dataset_name=str(tmp_path / "images.zip")))
