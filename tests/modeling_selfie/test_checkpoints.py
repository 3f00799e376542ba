import io
import json
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)

from modeling_selfie import (
    SelfieConfig,
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
    preset_image_processor,
    to_rgb,
)
from selfie_training.data import read_image
from selfie_training.timm_weights import load_timm_weights
from tests.utils import fixed_mask, images, run_in_fresh_offline_process, tiny_config


def outputs(model, config):
    torch.manual_seed(1)
    pixel_values = images(config)
    if isinstance(model, SelfieForImageClassification):
        return model(pixel_values).logits
    result = model(pixel_values, bool_masked_pos=fixed_mask(config))
    return result.logits if isinstance(model, SelfieForMaskedPatchPrediction) else result.pooler_output


@pytest.mark.parametrize("model_class", [SelfieModel, SelfieForMaskedPatchPrediction, SelfieForImageClassification])
def test_save_load_round_trip_is_bit_identical(tmp_path, model_class):
    config = tiny_config(classifier_head="attention_pooling")
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert torch.equal(outputs(model, config), outputs(reloaded, config))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def state_dict_under(model, prefix):
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith(prefix)}


def assert_same_tensors(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def pretrain_a_little(config) -> SelfieForMaskedPatchPrediction:
    """A pretraining model whose weights (and BatchNorm statistics) have moved away from any initialisation."""
    model = SelfieForMaskedPatchPrediction(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(images(config, 4)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_pretraining_checkpoint_carries_p_into_the_resnet_classifier(tmp_path):
    pretrained = pretrain_a_little(tiny_config())
    pretrained.save_pretrained(tmp_path)
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path, num_labels=7, output_loading_info=True
    )

    assert isinstance(classifier, SelfieForImageClassification)
    assert classifier.classifier.out_features == 7
    assert_same_tensors(
        state_dict_under(pretrained, "selfie.patch_network."), state_dict_under(classifier, "selfie.patch_network.")
    )
    # Fresh weights are reported the transformers way: stage 4 and the classifier missing, A unused.
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"layer4", "classifier"}
    assert {key.split(".")[1] for key in info["unexpected_keys"]} == {
        "attention_pooling",
        "position_embeddings",
        "patch_projection",
    }
    # Stage 4 starts as timm starts a ResNet stage: the last norm of every residual branch at zero.
    assert classifier.layer4[0].bn3.weight.abs().sum() == 0
    assert classifier.layer4[0].conv1.weight.std() > 0


def test_pretraining_checkpoint_carries_p_and_a_into_the_attention_pooling_classifier(tmp_path):
    pretrained = pretrain_a_little(tiny_config())
    pretrained.save_pretrained(tmp_path)
    classifier, info = SelfieForImageClassification.from_pretrained(
        tmp_path, classifier_head="attention_pooling", output_loading_info=True
    )
    assert_same_tensors(state_dict_under(pretrained, "selfie."), state_dict_under(classifier, "selfie."))
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"]


def test_checkpoints_move_between_the_base_model_and_the_heads(tmp_path):
    pretrained = pretrain_a_little(tiny_config())
    pretrained.save_pretrained(tmp_path / "pretraining")
    base = AutoModel.from_pretrained(tmp_path / "pretraining")
    assert type(base) is SelfieModel
    assert_same_tensors(
        {name.removeprefix("selfie."): t for name, t in pretrained.state_dict().items()}, base.state_dict()
    )
    base.save_pretrained(tmp_path / "base")
    head = AutoModelForPreTraining.from_pretrained(tmp_path / "base").eval()
    assert type(head) is SelfieForMaskedPatchPrediction
    assert torch.equal(outputs(head, pretrained.config), outputs(pretrained.eval(), pretrained.config))


def test_auto_classes_resolve_selfie():
    fields = {key: value for key, value in tiny_config().to_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("selfie", **fields)
    assert isinstance(config, SelfieConfig) and config.to_dict() == tiny_config().to_dict()
    assert type(AutoModel.from_config(config)) is SelfieModel
    assert type(AutoModelForPreTraining.from_config(config)) is SelfieForMaskedPatchPrediction
    assert type(AutoModelForImageClassification.from_config(config)) is SelfieForImageClassification


def test_saved_directory_holds_safetensors_code_and_auto_map(tmp_path):
    SelfieForImageClassification(tiny_config()).save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_selfie.py", "modeling_selfie.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    assert load_file(tmp_path / "model.safetensors")  # readable as plain safetensors
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_selfie.SelfieConfig",
        "AutoModel": "modeling_selfie.SelfieModel",
        "AutoModelForPreTraining": "modeling_selfie.SelfieForMaskedPatchPrediction",
        "AutoModelForImageClassification": "modeling_selfie.SelfieForImageClassification",
    }


def test_trust_remote_code_in_a_fresh_process_offline(tmp_path):
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    pixel_values, mask = images(config), fixed_mask(config)
    torch.save(
        {"pixel_values": pixel_values, "mask": mask, "logits": model(pixel_values, bool_masked_pos=mask).logits},
        tmp_path / "io.pt",
    )
    script = textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

        checkpoint, io = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
        model = AutoModelForPreTraining.from_pretrained(checkpoint, trust_remote_code=True).eval()
        logits = model(io["pixel_values"], bool_masked_pos=io["mask"]).logits
        assert torch.equal(logits, io["logits"]), "remote-code model gives other logits"
        for auto_class in (AutoModel, AutoModelForImageClassification):
            loaded = auto_class.from_pretrained(checkpoint, trust_remote_code=True)
            print(type(loaded).__module__, type(loaded).__name__)
        assert "modeling_selfie" not in sys.modules, "the installed package was imported"
        """
    )
    result = run_in_fresh_offline_process(script, str(tmp_path / "checkpoint"), str(tmp_path / "io.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert any(line.startswith("transformers_modules.") and line.endswith(" SelfieModel") for line in lines)
    assert any(line.endswith(" SelfieForImageClassification") for line in lines)


def test_a_classifier_without_attention_pooling_is_refused_as_a_feature_extractor(tmp_path):
    """A classifier with the "resnet" head holds P and stage 4: SelfieModel's A would be random, other features at
    every load. With the "attention_pooling" head it holds A, and loads whole."""
    SelfieForImageClassification(tiny_config()).save_pretrained(tmp_path / "resnet")
    preset_image_processor("cifar10").save_pretrained(tmp_path / "resnet")
    message = rf"^{tmp_path / 'resnet'} has no weights for \d+ of SelfieModel's tensors \('attention_pooling\."
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match=r"a classifier with the 'resnet' head holds no attention pooling network"):
        pipeline("image-feature-extraction", model=str(tmp_path / "resnet"))

    classifier = SelfieForImageClassification(tiny_config(classifier_head="attention_pooling"))
    classifier.save_pretrained(tmp_path / "attention_pooling")
    loads = [AutoModel.from_pretrained(tmp_path / "attention_pooling").eval() for _ in range(2)]
    pixel_values = images(classifier.config)
    with torch.no_grad():
        first, second = (model(pixel_values).pooler_output for model in loads)
    assert torch.equal(first, second)


def test_to_rgb_gives_a_pipeline_the_pixels_that_training_read(tmp_path):
    """A 16-bit grey image: the training scripts scale it to 8 bits (PIL's own conversion, which transformers' image
    readers use, clips it to white); `to_rgb` is their reading, for a pipeline's input."""
    image = Image.fromarray(np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16))
    assert image.mode == "I;16"
    file = io.BytesIO()
    image.save(file, "PNG")
    trained_on = read_image({"bytes": file.getvalue(), "path": None})
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(trained_on))
    assert 120 < np.asarray(trained_on).mean() < 135  # the ramp's middle grey, not white

    id2label = {0: "dark", 1: "light"}
    config = tiny_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = SelfieForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    preset_image_processor("cifar10").save_pretrained(tmp_path)
    predictions = pipeline("image-classification", model=str(tmp_path))(to_rgb(image))
    with torch.no_grad():
        logits = model(**AutoImageProcessor.from_pretrained(tmp_path)(trained_on, return_tensors="pt")).logits
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(
        {id2label[i]: score for i, score in enumerate(logits.softmax(-1)[0].tolist())}, abs=1e-5
    )


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_image_classification_pipeline(tmp_path, mode):
    id2label = {0: "airplane", 1: "bird", 2: "cat"}
    config = tiny_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = SelfieForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    processor = preset_image_processor("cifar10")
    processor.save_pretrained(tmp_path)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)).convert(mode)
    predictions = pipeline("image-classification", model=str(tmp_path))(image)

    inputs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    expected = sorted(((probabilities[i].item(), label) for i, label in id2label.items()), reverse=True)
    assert [p["label"] for p in predictions] == [label for _, label in expected]
    assert [p["score"] for p in predictions] == pytest.approx([score for score, _ in expected], abs=1e-5)


def test_timm_weights_start_p_and_stage4_and_keep_them(monkeypatch):
    # Stands in for timm's download: "pretrained" weights are all 0.5.
    original = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        model = original(name, **kwargs)
        if pretrained:
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.fill_(0.5)
        return model

    monkeypatch.setattr(timm, "create_model", create_model)

    model = SelfieForImageClassification(tiny_config(stem="imagenet"))
    load_timm_weights(model, "timm")
    assert (model.selfie.patch_network.layer1[0].conv1.weight == 0.5).all()
    assert (model.layer4[0].bn3.weight == 0.5).all()  # not zeroed by the fresh-stage initialisation
    assert not (model.classifier.weight == 0.5).all()

    cifar = SelfieModel(tiny_config(stem="cifar"))
    load_timm_weights(cifar, "timm")
    assert (cifar.patch_network.layer3[0].conv2.weight == 0.5).all()
    assert not (cifar.patch_network.conv1.weight == 0.5).all()  # the replaced stem starts fresh

    with pytest.raises(ValueError, match=r"^timm's weights need backbone_norm='batchnorm', not 'layernorm'\.$"):
        load_timm_weights(SelfieModel(tiny_config(backbone_norm="layernorm")), "timm")


def test_building_or_loading_a_model_never_downloads(tmp_path, monkeypatch):
    original = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        assert not pretrained, "the model asked timm for its weights"
        return original(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    for model_class in (SelfieModel, SelfieForMaskedPatchPrediction, SelfieForImageClassification):
        model_class(tiny_config()).save_pretrained(tmp_path / model_class.__name__)
        model = model_class.from_pretrained(tmp_path / model_class.__name__)
        assert_same_tensors(load_file(tmp_path / model_class.__name__ / "model.safetensors"), model.state_dict())
