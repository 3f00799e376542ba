"""Flags that would do nothing in a run are refused before it trains, naming why, rather than accepted silently."""

import re

import pytest

from modeling_selfie import PRESETS
from selfie_training import feature_evaluation as run_evaluation
from selfie_training.checkpoints import load_selfie_config
from selfie_training.runner import ModelArguments, check_preset_applies, load_image_processor
from tests.utils import TINY_MODEL_FLAGS, fine_tune, pretrain


SMALL_RUN = ["--max_train_samples", "64", "--max_eval_samples", "16", "--per_device_train_batch_size", "8"]


def test_a_preset_that_the_checkpoint_overrides_is_refused(tmp_path, pretrained):
    """The checkpoint (32-pixel images, 8-pixel patches, the CIFAR stem, ImageNet's normalisation) brings its own
    architecture and image processor: another preset's would not apply."""
    flags = ["--model_name_or_path", str(pretrained), *SMALL_RUN, "--max_steps", "1"]
    with pytest.raises(ValueError, match=r"^--preset imagenet224 does nothing here: .* \(image size 32x32, the preset's 224x224; patch size 8, the preset's 32; stem cifar, the preset's imagenet; resized shortest edge 32, the preset's 256\)"):  # fmt: skip
        fine_tune(tmp_path / "run", *flags, "--preset", "imagenet224")
    with pytest.raises(ValueError, match=r"^--preset cifar10 does nothing here: .* \(normalisation mean \[0\.485"):
        fine_tune(tmp_path / "run", *flags, "--preset", "cifar10")
    assert not (tmp_path / "run" / "model.safetensors").exists()

    # The checkpoint's own preset says what it has: accepted.
    model_args = ModelArguments(model_name_or_path=str(pretrained))
    config = load_selfie_config(str(pretrained), "--model_name_or_path")
    assert config.image_size == PRESETS["imagenet32"]["image_size"]
    check_preset_applies("imagenet32", model_args, config, load_image_processor(model_args, "imagenet32", config))


def test_freezing_the_pretrained_weights_for_the_whole_run_is_refused(tmp_path, pretrained):
    flags = ["--model_name_or_path", str(pretrained), *SMALL_RUN, "--freeze_pretrained_steps", "4"]
    message = "--freeze_pretrained_steps 4 holds the pretrained weights still for all the run's 4 steps"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}: none of them would be fine-tuned"):
        fine_tune(tmp_path / "run", *flags, "--max_steps", "4")
    with pytest.raises(ValueError, match=r"for all the run's 1 steps"):  # 64 images in batches of 8: 8 a epoch
        fine_tune(tmp_path / "run", *flags, "--num_train_epochs", "0.125")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_mixing_batches_of_one_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^--mixup_alpha and --cutmix_alpha mix each training image with another"):
        fine_tune(
            tmp_path / "run", *TINY_MODEL_FLAGS, "--mixup_alpha", "0.2", "--cutmix_alpha", "1",
            "--per_device_train_batch_size", "1", "--max_steps", "1",
        )  # fmt: skip


def test_training_for_no_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^--num_train_epochs 0 trains no step: give epochs or --max_steps"):
        pretrain(tmp_path / "run", "--num_train_epochs", "0")
    assert not (tmp_path / "run" / "README.md").exists()


def test_holding_batchnorm_statistics_without_batchnorm_is_refused(tmp_path, pretrained):
    with pytest.raises(ValueError, match=r"^--freeze_pretrained_batchnorm holds .* backbone_norm is 'groupnorm'"):
        fine_tune(
            tmp_path / "run", "--model_name_or_path", str(pretrained), "--config_overrides", "backbone_norm=groupnorm",
            "--freeze_pretrained_batchnorm", "--max_steps", "1",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--protocols", "linear_probe", "--knn_k", "10"], "--knn_k set the knn protocol, which --protocols"),
        (
            ["--protocols", "knn", "--probe_weight_decay", "0.1", "--probe_max_iterations", "5"],
            "--probe_weight_decay and --probe_max_iterations set the linear_probe protocol, which --protocols knn "
            "leaves out: add linear_probe to --protocols, or drop them.",
        ),
    ],
)
def test_settings_of_a_protocol_left_out_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        run_evaluation.main(["--output_dir", str(tmp_path), "--config_name", "unread", *flags])
    assert not list(tmp_path.iterdir())
