"""Property-based tests (hypothesis): config validation and the image pipeline over sizes, modes and bytes."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_selfie import PRESETS, SelfieConfig, preset_image_processor
from selfie_training.data import UNREADABLE_IMAGE_ERRORS, image_transform, read_image


FIELDS = {
    "image_size": st.one_of(
        st.integers(-4, 300), st.lists(st.integers(-4, 300), min_size=1, max_size=3), st.text(max_size=3)
    ),
    "patch_size": st.one_of(st.integers(-4, 80), st.floats(allow_nan=True)),
    "num_masked_patches": st.one_of(st.none(), st.integers(-3, 100), st.booleans()),
    "stem": st.sampled_from(["imagenet", "cifar", "tiny", ""]),
    "hidden_size": st.integers(-2, 64),
    "num_attention_heads": st.integers(-1, 9),
    "hidden_dropout_prob": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "score_temperature": st.one_of(st.none(), st.floats(-2, 2), st.just(float("nan"))),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_a_config_is_valid_or_a_value_error_names_its_field(fields):
    try:
        config = SelfieConfig(**fields)
    except ValueError as error:
        field = str(error).removeprefix("SelfieConfig.").split("=", 1)[0]
        assert str(error).startswith("SelfieConfig.") and field in SelfieConfig.__dataclass_fields__, error
        assert "\n" not in str(error)
        return
    height, width = config.image_height_width
    assert height % config.patch_size == 0 and width % config.patch_size == 0
    assert 2 <= config.num_masked_patches < config.num_patches
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.score_temperature is None or config.score_temperature > 0


MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"]


def encoded(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")  # TIFF stores every one of these modes
    return {"bytes": buffer.getvalue(), "path": None}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    mode=st.sampled_from(MODES),
    preset=st.sampled_from(sorted(PRESETS)),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_image_becomes_a_normalised_tensor_of_the_preset_size(width, height, mode, preset, train, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = read_image(encoded(Image.fromarray(pixels).convert(mode)))
    tensor = image_transform(preset_image_processor(preset), train=train, channel_drop_prob=0.5)(image)
    size = PRESETS[preset]["image_size"]
    assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all() and tensor.abs().max() < 10


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF"]), st.integers(0, 3))
def test_arbitrary_bytes_are_read_or_refused_as_unreadable(noise, format, damage):
    """Damaged files of every format either read as RGB or raise one of the errors the pipeline counts."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 20, 30)).save(buffer, format=format)
    content = buffer.getvalue()
    content = [noise, content[: len(content) // 2] + noise, content[:20] + noise, content + noise][damage]
    try:
        image = read_image({"bytes": content, "path": None})
    except UNREADABLE_IMAGE_ERRORS:
        return
    assert image.mode == "RGB"
