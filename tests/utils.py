"""What the tests share: tiny configs and inputs, the training scripts run in-process, and test images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modeling_selfie import SelfieConfig, random_patch_mask
from selfie_training import classification, pretraining


# A ResNet with one block a stage and 8-64 channels: P ends in 32 * 4 = 128 channels (bottleneck expansion 4).
TINY_BACKBONE = {"backbone": "resnet50", "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}}
TINY_ATTENTION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_config(**kwargs) -> SelfieConfig:
    """A Selfie config small enough for CPU tests: 32x32 images, 8x8 patches, the CIFAR stem, 4 of 16 hidden (the
    default; 8 with `masking_strategy="split"`)."""
    fields = {
        **TINY_BACKBONE,
        **TINY_ATTENTION,
        "image_size": 32,
        "patch_size": 8,
        "stem": "cifar",
    }
    if "id2label" not in kwargs:
        fields["num_labels"] = 3
    return SelfieConfig(**{**fields, **kwargs})


def images(config: SelfieConfig, batch_size: int = 2) -> torch.Tensor:
    height, width = config.image_height_width
    return torch.randn(batch_size, config.num_channels, height, width)


def fixed_mask(config: SelfieConfig, batch_size: int = 2) -> torch.BoolTensor:
    """A mask with different hidden positions in every row, none of them sorted alike."""
    generator = torch.Generator().manual_seed(1)
    return random_patch_mask(batch_size, config.num_patches, config.num_masked_patches, generator=generator)


def perturbed(model):
    """`model` with every float tensor moved off its initialisation (seeded), BatchNorm variances kept positive."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise)
            else:
                tensor.add_(0.1 * (noise - 0.5))
    return model


# Settings that make the training scripts' models tiny, as a dict (for JSON) and as flags.
TINY_MODEL = {
    "backbone": "resnet18",
    "backbone_kwargs": '{"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}',
    "config_overrides": "hidden_size=32,num_attention_heads=4,num_hidden_layers=1",
}
TINY_MODEL_FLAGS = [item for name, value in TINY_MODEL.items() for item in (f"--{name}", value)]
QUIET_FLAGS = ["--report_to", "none", "--disable_tqdm", "True", "--per_device_eval_batch_size", "16"]
REPOSITORY = Path(__file__).resolve().parent.parent  # the repository's root


def pretrain(output_dir: Path, *flags: str) -> dict:
    """run_pretraining.py in this process, tiny and quiet, training and evaluating."""
    return pretraining.main(
        ["--output_dir", str(output_dir), "--do_train", "--do_eval", *TINY_MODEL_FLAGS, *QUIET_FLAGS, *flags]
    )


def fine_tune(output_dir: Path, *flags: str) -> dict:
    """run_image_classification.py in this process, quiet, training and evaluating."""
    return classification.main(["--output_dir", str(output_dir), "--do_train", "--do_eval", *QUIET_FLAGS, *flags])


def class_images(num_classes: int, per_class: int, size=(40, 36), seed: int = 0):
    """Images whose colour says their class (so that a classifier can learn it), with a little noise."""
    generator = np.random.default_rng(seed)
    for label in range(num_classes):
        colour = np.array([255 * (label % 2), 255 * ((label // 2) % 2), 128], dtype=float)
        for _ in range(per_class):
            pixels = np.clip(colour + generator.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            yield Image.fromarray(pixels), label


def last_checkpoint(output: Path, **fields) -> str | None:
    """find_last_checkpoint as the scripts call it, inside the --output_dir lock."""
    from transformers import TrainingArguments

    from selfie_training.checkpoints import find_last_checkpoint, output_dir_lock

    args = TrainingArguments(output_dir=str(output), do_train=True, report_to="none", **fields)
    with output_dir_lock(args):
        return find_last_checkpoint(args)


# accelerate's torchrun launcher (--multi_gpu) on the CPU: two processes joined by gloo.
TWO_PROCESS_LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip


def run_in_fresh_offline_process(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -c script *args` offline, with a cold Hugging Face cache and no PYTHONPATH (so that code saved with a
    checkpoint must come from the checkpoint), in `cwd`; its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def launch_two_processes(script: Path, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of a training script in two CPU processes, offline; its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*TWO_PROCESS_LAUNCH, str(script), *flags],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
