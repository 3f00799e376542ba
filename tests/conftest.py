import pytest
import torch

from modeling_selfie import SelfieConfig, random_patch_mask


# A ResNet with one block a stage and 8-64 channels: P ends in 32 * 4 = 128 channels (bottleneck expansion 4).
TINY_BACKBONE = {"backbone": "resnet50", "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}}
TINY_ATTENTION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_config(**kwargs) -> SelfieConfig:
    """A Selfie config small enough for CPU tests: 32x32 images, 8x8 patches, the CIFAR stem, 4 of 16 hidden."""
    fields = {
        **TINY_BACKBONE,
        **TINY_ATTENTION,
        "image_size": 32,
        "patch_size": 8,
        "stem": "cifar",
        "num_masked_patches": 4,
    }
    if "id2label" not in kwargs:
        fields["num_labels"] = 3
    return SelfieConfig(**{**fields, **kwargs})


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def images(config: SelfieConfig, batch_size: int = 2) -> torch.Tensor:
    height, width = config.image_height_width
    return torch.randn(batch_size, config.num_channels, height, width)


def fixed_mask(config: SelfieConfig, batch_size: int = 2) -> torch.BoolTensor:
    """A mask with different hidden positions in every row, none of them sorted alike."""
    generator = torch.Generator().manual_seed(1)
    return random_patch_mask(batch_size, config.num_patches, config.num_masked_patches, generator=generator)
