"""Bad image files: skipped, named and counted, never a traceback from inside PIL; too many stop the run. Images
of other bit depths, orientations and modes: read as `datasets` and `transformers` read them, or refused by name."""

import io
import json
import logging
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms
from transformers.image_utils import load_image

from selfie_training import pretraining as run_pretraining
from selfie_training.data import UNREADABLE_IMAGE_ERRORS, read_image
from selfie_training.errors import TrainingStopped
from tests.utils import QUIET_FLAGS, TINY_MODEL_FLAGS, class_images


def encoded(image: Image.Image, format: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> dict:
    """A PNG written by hand, for what PIL cannot write: 16 bits a colour channel, a zero width."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    content = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return {"bytes": content, "path": None}


def sixteen_bit_png(pixels: np.ndarray, colour_type: int) -> dict:
    """`pixels` (height, width, channels) as a PNG of 16 bits per channel: colour type 2 is RGB, 4 grey and alpha."""
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 (none) before every row
    return png(pixels.shape[1], pixels.shape[0], 16, colour_type, rows)


RAMP = np.linspace(0, 1, 24 * 32).reshape(24, 32)  # every level from black to white


@pytest.mark.parametrize(
    ("pixels", "format", "top"),
    [
        (np.float32(RAMP), "TIFF", 1),  # float (mode F) in [0, 1]: was all black
        (np.float32(RAMP * 255), "TIFF", 255),  # float 8-bit levels
        (np.int32(RAMP * 1_000_000), "TIFF", 2**20 - 1),  # 32-bit integers (mode I), 20 bits: was all white
        (np.int32(RAMP * 255), "TIFF", 255),  # 8-bit values stored in mode I
        (np.uint16(RAMP * 4095), "PNG", 4095),  # 12-bit data in a 16-bit PNG: was nearly black
        (np.uint16(RAMP * 1000), "PNG", 1023),  # 10 bits
        (np.uint16(RAMP * 65535), "PNG", 65535),
        (np.uint16(RAMP * 65535).astype(">u2"), "TIFF", 65535),  # mode I;16B
    ],
    ids=["float-0-1", "float-0-255", "int32", "int32-8-bit", "12-bit-png", "10-bit-png", "16-bit-png", "I;16B-tiff"],
)
def test_images_of_other_bit_depths_are_scaled_by_the_even_bit_range_of_their_largest_value(pixels, format, top):
    image = read_image(encoded(Image.fromarray(pixels), format))
    expected = np.rint(pixels.astype(np.float64) * (255 / top))
    assert image.mode == "RGB" and expected.max() > 240  # a ramp up to white, whatever the bit depth
    np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (encoded(Image.fromarray(np.int32(RAMP * 4000 - 1024)), "TIFF"), r"negative pixel values \(down to -1024\)"),
        (encoded(Image.fromarray(np.float32(RAMP - 0.5)), "TIFF"), r"negative pixel values \(down to -0\.5\)"),
        (encoded(Image.fromarray(np.float32(np.where(RAMP > 0.5, np.nan, RAMP))), "TIFF"), "NaN or infinite"),
        (sixteen_bit_png(np.repeat(RAMP[..., None] * 4095, 3, axis=2), 2), "16-bit channels all below 4096"),
        (sixteen_bit_png(np.stack([RAMP * 4095, RAMP * 0 + 65535], axis=2), 4), "16-bit channels all below 4096"),
    ],
    ids=["int32-negative", "float-negative", "float-nan", "12-bit-rgb-png", "12-bit-grey-alpha-png"],
)
def test_images_the_rule_cannot_read_are_refused_with_a_reason(content, reason):
    with pytest.raises(ValueError, match=reason):
        read_image(content)


def test_sixteen_bit_colour_keeps_the_high_byte():
    pixels = np.stack([RAMP * 65535, RAMP[::-1] * 65535, RAMP * 0 + 30000], axis=2).astype(np.uint16)
    image = read_image(sixteen_bit_png(pixels, 2))
    np.testing.assert_array_equal(np.asarray(image), pixels >> 8)


def test_zero_width_or_height_is_unreadable():
    for width, height in [(0, 4), (4, 0)]:
        with pytest.raises(UNREADABLE_IMAGE_ERRORS):
            read_image(png(width, height, 8, 2, b""))


def halves(width: int, height: int) -> Image.Image:
    """Red on the left, blue on the right: where the halves end up shows how the image was turned."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    return Image.fromarray(pixels)


def test_exif_orientation_turns_the_image_upright_as_transformers_does(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # the camera was turned: show the stored image turned 90 degrees clockwise
    path = tmp_path / "turned.jpg"
    halves(40, 20).save(path, exif=exif, quality=95)
    pixels = np.asarray(read_image({"bytes": None, "path": str(path)}))
    assert pixels.shape == (40, 20, 3)  # upright: 20 wide, 40 high
    assert tuple(pixels[5, 10]) > (200, 0, 0) and pixels[5, 10, 2] < 50  # red on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 50  # blue below
    np.testing.assert_array_equal(pixels, np.asarray(load_image(str(path))))


def frames(format: str) -> dict:
    """Two frames in one file: red, then blue."""
    red, blue = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
    buffer = io.BytesIO()
    red.save(buffer, format=format, save_all=True, append_images=[blue])
    return buffer.getvalue()


def with_icc_profile() -> bytes:
    buffer = io.BytesIO()
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (16, 12), (255, 0, 0)).save(buffer, format="PNG", icc_profile=profile)
    return buffer.getvalue()


def adobe_cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 12), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=95)  # inverted, Adobe marker
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make",
    [lambda: frames("GIF"), lambda: frames("TIFF"), lambda: frames("PNG"), with_icc_profile, adobe_cmyk_jpeg],
    ids=["gif-frames", "tiff-pages", "animated-png", "icc-profile", "adobe-cmyk-jpeg"],
)
def test_first_frames_icc_profiles_and_adobe_cmyk_read_as_transformers_reads_them(tmp_path, make):
    path = tmp_path / "image"
    path.write_bytes(make())
    pixels = np.asarray(read_image({"bytes": None, "path": str(path)}))
    assert pixels.shape == (12, 16, 3) and np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 2  # the red frame
    np.testing.assert_array_equal(pixels, np.asarray(load_image(str(path))))


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
    metrics = run_pretraining.main(
        [
            "--output_dir",
            str(output),
            "--do_train",
            "--do_eval",
            "--train_dir",
            str(folder),
            "--train_val_split",
            "0.2",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "8",
            *TINY_MODEL_FLAGS,
            *QUIET_FLAGS,
        ]
    )

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
    with pytest.raises(
        TrainingStopped,
        match=r"of the \d+ images read so far could not be decoded, more than --max_unreadable_fraction 0.001; they are listed in",
    ):
        run_pretraining.main(
            [
                "--output_dir",
                str(tmp_path / "run"),
                "--do_train",
                "--train_dir",
                str(folder),
                "--max_steps",
                "4",
                "--per_device_train_batch_size",
                "8",
                "--max_unreadable_fraction",
                "0.001",
                *TINY_MODEL_FLAGS,
                *QUIET_FLAGS,
            ]
        )
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_batch_without_a_readable_image_is_skipped_and_its_file_named(tmp_path, caplog):
    train, validation = tmp_path / "train", tmp_path / "validation"
    for folder, count in [(train, 6), (validation, 4)]:
        folder.mkdir()
        for index, (image, _) in enumerate(class_images(1, count, seed=count)):
            image.save(folder / f"good_{index}.png")
    for folder in (train, validation):
        (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    flags = [
        "--do_train",
        "--train_dir",
        str(train),
        "--validation_dir",
        str(validation),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "1",
        *TINY_MODEL_FLAGS,
        *QUIET_FLAGS,
        "--per_device_eval_batch_size",
        "1",
        "--resident_images",  # the per-image path, which reads the images batch by batch (resident: all at load)
        "False",
    ]

    output = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="selfie_training.trainer"):
        metrics = run_pretraining.main(["--output_dir", str(output), "--do_eval", *flags])
    assert (output / "model.safetensors").is_file() and math.isfinite(metrics["eval_loss"])
    assert (
        json.loads((output / "trainer_state.json").read_text())["global_step"] == 7
    )  # every batch, the empty one too
    named = (output / "unreadable_images.txt").read_text().splitlines()
    assert len(named) == 2 and named[0].startswith(f"{train / 'corrupt.png'} (")
    assert named[1].startswith(f"{validation / 'corrupt.png'} (")  # evaluation skips its empty batch too
    assert f"Skipped an unreadable image: {named[0]}" in caplog.text

    # The empty batch still counts against --max_unreadable_fraction: 1 of at least 1,000 images is over 0.0005.
    with pytest.raises(TrainingStopped, match=r"1 of the \d+ images read so far could not be decoded"):
        run_pretraining.main(["--output_dir", str(tmp_path / "strict"), "--max_unreadable_fraction", "0.0005", *flags])
