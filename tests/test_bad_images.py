"""Bad image files: skipped, named and counted, never a traceback from inside PIL; too many stop the run."""

import io

import numpy as np
import pytest
from conftest import QUIET_FLAGS, TINY_MODEL_FLAGS, class_images
from PIL import Image

import run_pretraining
from selfie_training.data import UNREADABLE_IMAGE_ERRORS, read_image
from selfie_training.trainer import TrainingStopped


def encoded(image: Image.Image, format: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = read_image(encoded(Image.fromarray(ramp), "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
    assert 100 < pixels.mean() < 155  # a ramp, not a white square


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    format = "JPEG" if mode in ("CMYK",) else "PNG"
    assert read_image(encoded(image, format)).mode == "RGB"


def test_decompression_bombs_are_unreadable(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100x100 image is then a bomb (over twice the limit)
    with pytest.raises(UNREADABLE_IMAGE_ERRORS):
        read_image(encoded(Image.new("RGB", (100, 100)), "PNG"))


def write_bad_files(folder) -> set[str]:
    """Zero-byte, truncated, corrupt and not-an-image files with image names; returns their names."""
    good_jpeg = encoded(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")["bytes"]
    bad = {
        "empty.png": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "notes.jpg": b"shopping list: milk, eggs\n",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return set(bad)


def test_pretraining_skips_and_names_bad_files_and_keeps_the_odd_good_ones(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (image, _) in enumerate(class_images(2, 20, size=(40, 30))):
        image.save(folder / f"good_{index}.png")
    Image.fromarray(np.uint16(np.random.default_rng(0).integers(0, 65535, (48, 48)))).save(folder / "sixteen_bit.png")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (3, 2), (0, 255, 0)).save(folder / "tiny.png")  # smaller than the 32x32 crop
    Image.new("RGB", (3000, 2000), (0, 0, 255)).save(folder / "large.jpg")
    bad = write_bad_files(folder)

    output = tmp_path / "run"
    metrics = run_pretraining.main([
        "--output_dir", str(output), "--do_train", "--do_eval", "--train_dir", str(folder), "--train_val_split", "0.2",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", *TINY_MODEL_FLAGS, *QUIET_FLAGS,
    ])

    assert (output / "model.safetensors").is_file() and metrics["eval_loss"] > 0
    named = (output / "unreadable_images.txt").read_text().splitlines()
    assert len(named) == len(bad)  # each bad file once (one epoch), by name:
    assert {line.split(" (")[0].rsplit("/", 1)[-1] for line in named} == bad
    assert all("Error" in line for line in named)


def test_too_many_bad_files_stop_the_run(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (image, _) in enumerate(class_images(1, 12)):
        image.save(folder / f"good_{index}.png")
    write_bad_files(folder)
    with pytest.raises(TrainingStopped, match=r"of the \d+ images read so far could not be decoded, more than --max_unreadable_fraction 0.001; they are listed in"):
        run_pretraining.main([
            "--output_dir", str(tmp_path / "run"), "--do_train", "--train_dir", str(folder), "--max_steps", "4",
            "--per_device_train_batch_size", "8", "--max_unreadable_fraction", "0.001", *TINY_MODEL_FLAGS, *QUIET_FLAGS,
        ])
    assert not (tmp_path / "run" / "model.safetensors").exists()
