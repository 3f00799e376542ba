"""Export to timm: the README's `timm.create_model` calls load the exported weights and give Selfie's outputs."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from modeling_selfie import SelfieForImageClassification, SelfieForMaskedPatchPrediction
from selfie_training import export as export_timm
from selfie_training.timm_weights import load_timm_weights, save_timm_weights, timm_state_dict
from tests.utils import REPOSITORY, TINY_BACKBONE, images, tiny_config


BACKBONE, KWARGS = TINY_BACKBONE["backbone"], TINY_BACKBONE["backbone_kwargs"]  # a tiny resnet50


def trained_like(model):
    """`model` in eval mode, every float tensor (BatchNorm statistics too) moved off its initialisation."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9)  # keeps variances positive
    return model.eval()


def export(model, tmp_path) -> str:
    """Save `model` as a Selfie checkpoint and run export_timm.py on it."""
    model.save_pretrained(tmp_path / "checkpoint")
    output_file = str(tmp_path / "timm" / "resnet.safetensors")  # into a folder that does not exist yet
    return export_timm.main(["--model_name_or_path", str(tmp_path / "checkpoint"), "--output_file", output_file])


def use_cifar_stem(resnet):
    """What a timm user does to match Selfie's CIFAR stem: one 3x3 stride-1 convolution, no max-pool."""
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, 3, padding=1, bias=False)
    resnet.maxpool = nn.Identity()


def assert_holds_exactly(timm_model, path):
    """Every tensor of the timm model came from the file, and the file has no other."""
    exported = load_file(path)
    assert timm_model.state_dict().keys() == exported.keys()
    for name, tensor in timm_model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name


def test_pretraining_export_loads_as_timm_features(tmp_path):
    model = trained_like(SelfieForMaskedPatchPrediction(tiny_config(stem="imagenet")))
    path = export(model, tmp_path)
    assert {name.split(".")[0] for name in load_file(path)} == {"conv1", "bn1", "layer1", "layer2", "layer3"}

    # timm loads into the whole ResNet before cutting it to features; the cut drops layer4 and fc, which the file
    # lacks (timm logs them as missing): what is left holds exactly the file's tensors.
    features = timm.create_model(
        BACKBONE,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        features_only=True,
        out_indices=(3,),
        **KWARGS,
    ).eval()
    assert_holds_exactly(features, path)
    pixel_values = images(model.config)
    with torch.no_grad():
        torch.testing.assert_close(features(pixel_values)[0], model.selfie.feature_map(pixel_values))
    # The same, strictly: checkpoint_path loads after the cut.
    strict = timm.create_model(BACKBONE, features_only=True, out_indices=(3,), checkpoint_path=path, **KWARGS)
    assert_holds_exactly(strict, path)


def test_cifar_stem_pretraining_export_loads_into_a_rebuilt_stem(tmp_path):
    model = trained_like(SelfieForMaskedPatchPrediction(tiny_config(stem="cifar")))
    path = export(model, tmp_path)
    features = timm.create_model(BACKBONE, features_only=True, out_indices=(3,), **KWARGS)
    use_cifar_stem(features)
    timm.models.load_checkpoint(features, path)  # strict
    features.eval()
    assert_holds_exactly(features, path)
    pixel_values = images(model.config)
    with torch.no_grad():
        torch.testing.assert_close(features(pixel_values)[0], model.selfie.feature_map(pixel_values))


def test_classifier_export_loads_as_a_timm_classifier(tmp_path):
    model = trained_like(SelfieForImageClassification(tiny_config(stem="imagenet", num_labels=3)))
    path = export(model, tmp_path)
    resnet = timm.create_model(
        BACKBONE, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=3), num_classes=3, **KWARGS
    ).eval()
    assert_holds_exactly(resnet, path)
    pixel_values = images(model.config)
    with torch.no_grad():
        torch.testing.assert_close(resnet(pixel_values), model(pixel_values).logits)

    # For other classes timm drops the file's classifier and keeps the rest ...
    other = timm.create_model(
        BACKBONE, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=3), num_classes=5, **KWARGS
    )
    assert other.fc.out_features == 5 and torch.equal(other.layer4[0].conv1.weight, model.layer4[0].conv1.weight)
    # ... and it does so too when the overlay does not say how many classes the file has (timm's default is 1000).
    unsaid = timm.create_model(
        BACKBONE, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=3, **KWARGS
    )
    assert not torch.equal(unsaid.fc.weight, model.classifier.weight)


def test_cifar_stem_classifier_export(tmp_path):
    model = trained_like(SelfieForImageClassification(tiny_config(stem="cifar", num_labels=3)))
    path = export(model, tmp_path)
    resnet = timm.create_model(BACKBONE, num_classes=3, **KWARGS)
    use_cifar_stem(resnet)
    timm.models.load_checkpoint(resnet, path)
    resnet.eval()
    pixel_values = images(model.config)
    with torch.no_grad():
        torch.testing.assert_close(resnet(pixel_values), model(pixel_values).logits)


def test_attention_pooling_classifier_exports_p_alone():
    model = SelfieForImageClassification(tiny_config(classifier_head="attention_pooling"))
    exported = timm_state_dict(model)
    assert exported.keys() == model.selfie.patch_network.state_dict().keys()


def test_export_and_import_share_the_names(tmp_path):
    model = trained_like(SelfieForImageClassification(tiny_config(stem="imagenet")))
    save_timm_weights(model, str(tmp_path / "resnet.safetensors"))
    fresh = SelfieForImageClassification(tiny_config(stem="imagenet"))
    load_timm_weights(fresh, str(tmp_path / "resnet.safetensors"))
    for part in ("selfie.patch_network.", "layer4."):
        names = [name for name in model.state_dict() if name.startswith(part)]
        assert names
        for name in names:
            assert torch.equal(fresh.state_dict()[name], model.state_dict()[name]), name


def test_bad_export_arguments_give_one_line_errors(tmp_path):
    SelfieForMaskedPatchPrediction(tiny_config()).save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "a_file").write_text("")
    checkpoint = str(tmp_path / "checkpoint")
    cases = [
        ([str(tmp_path / "nothing"), "out.safetensors"], r"^--model_name_or_path .*nothing: no readable config\.json"),
        (
            [str(tmp_path / "bert"), "out.safetensors"],
            r"^--model_name_or_path .*bert holds a 'bert' model, not a Selfie one",
        ),
        ([checkpoint, str(tmp_path / "out.pth")], r"^--output_file .*out\.pth must end in \.safetensors"),
        (
            [checkpoint, str(tmp_path / "a_file" / "out.safetensors")],
            r"^--output_file .*a_file/out\.safetensors: cannot write it",
        ),
    ]
    for (source, output), message in cases:
        with pytest.raises(ValueError, match=message):
            export_timm.main(["--model_name_or_path", source, "--output_file", output])


def test_export_script_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "export_timm.py"),
            "--model_name_or_path",
            str(tmp_path),
            "--output_file",
            "x.pth",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "export_timm.py: error: --output_file x.pth must end in .safetensors: timm reads the format from the name."
    )
