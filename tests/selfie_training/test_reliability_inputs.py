"""Bad input files and flags (issue 15): checkpoints whose weights, config or image processor cannot be what they
claim, exports that would overwrite, flags that change a checkpoint's shapes; each refused in one line that names
the flag, file or tensor at fault, before anything is written."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTImageProcessor

from modeling_selfie import (
    SelfieConfig,
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
)
from selfie_training import export as export_timm
from selfie_training import feature_evaluation as run_evaluation
from selfie_training.checkpoints import load_checkpoint, load_selfie_config
from selfie_training.runner import ModelArguments, load_image_processor
from selfie_training.timm_weights import load_timm_weights, save_timm_weights, timm_state_dict
from tests.utils import QUIET_FLAGS, fine_tune, pretrain, tiny_config


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*"))
    return target


def edit_weights(checkpoint: Path, edit):
    weights = load_file(checkpoint / "model.safetensors")
    save_file(edit(weights), checkpoint / "model.safetensors", metadata={"format": "pt"})


def export(checkpoint: Path, output_file: Path, *flags: str) -> str:
    return export_timm.main(["--model_name_or_path", str(checkpoint), "--output_file", str(output_file), *flags])


def evaluate(output_dir: Path, *flags: str) -> dict:
    return run_evaluation.main(
        [
            "--output_dir",
            str(output_dir),
            "--max_train_samples",
            "50",
            "--max_eval_samples",
            "30",
            *QUIET_FLAGS,
            *flags,
        ]
    )


def patch_network_size(checkpoint: Path) -> int:
    return len(SelfieModel.from_pretrained(checkpoint).patch_network.state_dict())


def test_export_never_overwrites_a_file_and_never_writes_into_the_checkpoint(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    weights = (checkpoint / "model.safetensors").read_bytes()
    for output_file in (checkpoint / "model.safetensors", checkpoint / "timm" / "resnet.safetensors"):
        for flags in ([], ["--overwrite"]):
            with pytest.raises(
                ValueError,
                match=rf"^--output_file {output_file} is inside the checkpoint --model_name_or_path {checkpoint}: write it elsewhere\.$",
            ):
                export(checkpoint, output_file, *flags)
    assert (checkpoint / "model.safetensors").read_bytes() == weights
    assert not (checkpoint / "timm").exists()

    output_file = tmp_path / "resnet.safetensors"
    output_file.write_text("the user's file")
    with pytest.raises(ValueError, match=rf"^--output_file {output_file} exists: add --overwrite to replace it\.$"):
        export(checkpoint, output_file)
    assert output_file.read_text() == "the user's file"
    export(checkpoint, output_file, "--overwrite")
    assert load_file(output_file).keys() == timm_state_dict(SelfieModel.from_pretrained(checkpoint)).keys()


def test_non_finite_weights_are_refused_naming_the_checkpoint_and_nothing_is_written(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    name = "selfie.patch_network.layer2.0.conv1.weight"
    edit_weights(
        checkpoint, lambda weights: {**weights, name: weights[name].index_fill(0, torch.tensor([0]), float("nan"))}
    )
    card = (checkpoint / "README.md").read_text()
    message = rf"^--model_name_or_path {checkpoint}: tensor '{name}' holds NaN or infinite values"
    with pytest.raises(ValueError, match=message):  # it used to write knn_top1 = 0.5
        evaluate(tmp_path / "eval", "--model_name_or_path", str(checkpoint), "--protocols", "knn")
    assert not list((tmp_path / "eval").glob("*.json"))
    assert (checkpoint / "README.md").read_text() == card
    with pytest.raises(ValueError, match=message):
        fine_tune(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_features_that_overflow_are_refused_and_nothing_is_written(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    # Finite weights whose products overflow float32 (3.4e38) by the second convolution.
    huge = ("selfie.patch_network.conv1.weight", "selfie.patch_network.layer1.0.conv1.weight")
    edit_weights(
        checkpoint,
        lambda weights: {name: tensor * 1e30 if name in huge else tensor for name, tensor in weights.items()},
    )
    with pytest.raises(
        ValueError,
        match=rf"^--model_name_or_path {checkpoint} gives NaN or infinite features for the training images; nothing was written\.$",
    ):
        evaluate(tmp_path / "eval", "--model_name_or_path", str(checkpoint), "--protocols", "knn")
    assert not list((tmp_path / "eval").glob("*.json"))


def test_non_finite_timm_weights_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_timm_weights(SelfieModel(tiny_config()), str(path))
    weights = load_file(path)
    weights["layer1.0.bn1.running_var"][0] = float("inf")
    save_file(weights, path)
    with pytest.raises(
        ValueError, match=rf"^{path}: tensor 'layer1\.0\.bn1\.running_var' holds NaN or infinite values\.$"
    ):
        load_timm_weights(SelfieModel(tiny_config()), str(path))


@pytest.mark.parametrize("damage", ["other names", "timm names", "one missing"])
def test_weights_that_do_not_fill_the_patch_network_are_refused(tmp_path, pretrained, damage):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    size, missing, loaded = patch_network_size(checkpoint), "selfie.patch_network.conv1.weight", 0
    if damage == "other names":
        edit_weights(checkpoint, lambda weights: {f"model.{name}": tensor for name, tensor in weights.items()})
    if damage == "timm names":  # what export_timm.py into the checkpoint's own file used to leave
        save_timm_weights(SelfieModel.from_pretrained(checkpoint), str(checkpoint / "model.safetensors"))
    if damage == "one missing":
        missing, loaded = "selfie.patch_network.layer3.0.bn2.running_var", size - 1
        edit_weights(checkpoint, lambda weights: {name: tensor for name, tensor in weights.items() if name != missing})
    with pytest.raises(
        ValueError,
        match=(
            rf"^--model_name_or_path {checkpoint}: its model\.safetensors holds {loaded} of the {size} tensors of the patch "
            rf"network \('{missing}' is missing\): are its tensor names another model's\?$"
        ),
    ):
        fine_tune(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")
    assert not (tmp_path / "run" / "README.md").exists()  # no card claiming "Selfie pretraining -> fine-tuning"


def test_the_partial_loads_between_heads_still_work(tmp_path, pretrained):
    patch_network = {
        name: tensor
        for name, tensor in load_file(pretrained / "model.safetensors").items()
        if ".patch_network." in name
    }
    resnet_head = load_checkpoint(
        SelfieForImageClassification, str(pretrained)
    )  # no stage 4 or classifier in the file
    attention_head = load_checkpoint(
        SelfieForImageClassification, str(pretrained), classifier_head="attention_pooling"
    )
    resnet_head.save_pretrained(tmp_path / "classifier")
    from_classifier = load_checkpoint(SelfieForMaskedPatchPrediction, str(tmp_path / "classifier"))  # A starts fresh
    # A base model's output is the attention pooling network's, which the resnet head's checkpoint does not hold.
    with pytest.raises(ValueError, match=r"a classifier with the 'resnet' head holds no attention pooling network"):
        load_checkpoint(SelfieModel, str(tmp_path / "classifier"))
    for model in (resnet_head, attention_head, from_classifier):
        state = {
            name if name.startswith("selfie.") else f"selfie.{name}": tensor
            for name, tensor in model.state_dict().items()
        }
        for name, tensor in patch_network.items():
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--backbone_kwargs", '{"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}'],
            r"tensor 'selfie\.patch_network\.layer1\.0\.conv1\.weight' has shape \(8, 64, 3, 3\) in the checkpoint but "
            r"\(16, 64, 3, 3\) in the model \(45 differing tensors; changed by --backbone, --backbone_kwargs, "
            r"--config_overrides or --classifier_head\?\): the patch network must keep the checkpoint's shapes\.$",
        ),
        (
            ["--config_overrides", "hidden_size=64,num_attention_heads=4,num_hidden_layers=1"],
            r"tensor 'selfie\.position_embeddings\.rows' has shape \(4, 32\) in the checkpoint but \(4, 64\) in the model "
            r"\(17 differing tensors; .*\): add --ignore_mismatched_sizes to start such tensors afresh\.$",
        ),
    ],
)
def test_flags_that_change_a_checkpoints_shapes_are_refused_naming_the_tensor(tmp_path, pretrained, flags, message):
    with pytest.raises(ValueError, match=rf"^--model_name_or_path {pretrained}: {message}"):
        pretrain(tmp_path / "run", "--model_name_or_path", str(pretrained), "--max_steps", "1", *flags)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_another_head_on_a_classifier_needs_ignore_mismatched_sizes(tmp_path, pretrained):
    classifier = tmp_path / "classifier"
    digits = {index: str(index) for index in range(10)}  # the classes of the digits that it fine-tunes on
    load_checkpoint(SelfieForImageClassification, str(pretrained), id2label=digits).save_pretrained(classifier)
    shutil.copy(pretrained / "preprocessor_config.json", classifier)
    with pytest.raises(
        ValueError,
        match=(
            rf"^--model_name_or_path {classifier}: tensor 'classifier\.weight' has shape \(10, 64\) in the checkpoint but "
            r"\(10, 32\) in the model .*: add --ignore_mismatched_sizes to start such tensors afresh\.$"
        ),
    ):  # it used to be a RuntimeError from transformers
        fine_tune(tmp_path / "run", "--model_name_or_path", str(classifier), "--classifier_head", "attention_pooling")


def test_ignore_mismatched_sizes_starts_other_tensors_afresh_but_never_the_patch_network(pretrained):
    wider = SelfieConfig.from_pretrained(pretrained, hidden_size=64)
    model = load_checkpoint(
        SelfieForMaskedPatchPrediction, str(pretrained), config=wider, ignore_mismatched_sizes=True
    )
    assert model.selfie.position_embeddings.rows.shape == (4, 64)
    saved = load_file(pretrained / "model.safetensors")["selfie.patch_network.layer3.0.conv2.weight"]
    assert torch.equal(model.selfie.patch_network.layer3[0].conv2.weight, saved)

    backbone_kwargs = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}
    other = SelfieConfig.from_pretrained(pretrained, backbone_kwargs=backbone_kwargs)
    with pytest.raises(ValueError, match=r"the patch network must keep the checkpoint's shapes\.$"):
        load_checkpoint(SelfieForMaskedPatchPrediction, str(pretrained), config=other, ignore_mismatched_sizes=True)


@pytest.mark.parametrize(
    ("backbone_kwargs", "message"),
    [
        (
            "{layers: [1, 1, 1, 1]}",
            r"^--backbone_kwargs '\{layers: \[1, 1, 1, 1\]\}' is not JSON \(Expecting property name",
        ),
        (
            "[1, 1, 1, 1]",
            r"^--backbone_kwargs '\[1, 1, 1, 1\]' must be a JSON object of timm\.create_model arguments\.$",
        ),
        (
            '{"depth": 4}',
            r"^SelfieConfig\.backbone_kwargs=\{'depth': 4\} has 'depth', which is not an argument of timm's ResNet\.$",
        ),
        (
            '{"in_chans": 1}',
            r"^SelfieConfig\.backbone_kwargs=\{'in_chans': 1\} sets 'in_chans', which Selfie sets from num_channels\.$",
        ),
        (
            '{"channels": [8, 16]}',
            r"^SelfieConfig\.backbone_kwargs=.* channels must be a list of 4 positive ints, one per stage\.$",
        ),
        (
            '{"layers": [1, 1, 1, 0]}',
            r"^SelfieConfig\.backbone_kwargs=.* layers must be a list of 4 positive ints, one per stage\.$",
        ),
        (
            '{"drop_path_rate": "high"}',
            r"^SelfieConfig\.backbone_kwargs=\{'drop_path_rate': 'high'\}: timm's resnet18 cannot be built with them \(",
        ),
    ],
)
def test_bad_backbone_kwargs_are_refused_in_one_line(tmp_path, backbone_kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrain(tmp_path / "run", "--max_steps", "1", "--backbone_kwargs", backbone_kwargs)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_config_json_that_is_not_a_selfie_config_is_refused_naming_it(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    cases = [
        (json.dumps([config]), r"its config\.json holds a JSON list, not an object of fields\.$"),
        (json.dumps({**config, "id2label": ["a", "b"]}), r"its config\.json is not a valid Selfie config: "),
        (
            json.dumps({**config, "image_size": "32"}),
            r"its config\.json is not a valid Selfie config: SelfieConfig\.image_size='32'",
        ),
    ]
    for text, message in cases:
        (checkpoint / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"^--model_name_or_path {checkpoint}: {message}"):
            export(checkpoint, tmp_path / "resnet.safetensors")


def test_a_config_json_with_an_unknown_field_is_refused_naming_the_field_it_may_mean(tmp_path, pretrained):
    """A misspelt field would be ignored (the run trains with the default) and copied into the new checkpoint."""
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "masking_stratgy": "split"}))
    message = (
        f"--model_name_or_path {checkpoint}: its config.json has unknown field 'masking_stratgy' (masking_strategy?), "
        "which this version of Selfie does not read: correct or remove them"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        pretrain(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")
    assert not (tmp_path / "run" / "config.json").exists()

    # What earlier versions wrote into config.json (where the weights came from) is no unknown field.
    (checkpoint / "config.json").write_text(json.dumps({**config, "training_stages": [{"task": "pretraining"}]}))
    assert load_selfie_config(str(checkpoint), "--model_name_or_path").masking_strategy == "random"


def processor_file(pretrained: Path, **changes) -> str:
    fields = {**json.loads((pretrained / "preprocessor_config.json").read_text()), **changes}
    return json.dumps({name: value for name, value in fields.items() if value is not None})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda pretrained: "{not json", r" is not a readable JSON file \(Expecting property name"),
        (lambda pretrained: "[]", r" holds a JSON list, not the fields of an image processor\.$"),
        (
            lambda pretrained: ViTImageProcessor().to_json_string(),
            r": image_processor_type='ViTImageProcessor' must be a BitImageProcessor",
        ),
        (
            lambda pretrained: processor_file(pretrained, crop_size=None),
            r": crop_size=None must be \{'height': int, 'width': int\}",
        ),
        (
            lambda pretrained: processor_file(pretrained, size={"height": 32, "width": 32}),
            r": size=\{'height': 32, 'width': 32\} must be",
        ),
        (
            lambda pretrained: processor_file(pretrained, image_std=[0, 1, 1]),
            r": image_std=\[0, 1, 1\] must be 3 positive numbers",
        ),
        (lambda pretrained: processor_file(pretrained, do_normalize=False), r": do_normalize=False must be true"),
    ],
)
def test_a_bad_image_processor_file_is_refused_naming_it_and_the_field(tmp_path, pretrained, content, message):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    (checkpoint / "preprocessor_config.json").write_text(content(pretrained))
    with pytest.raises(ValueError, match=rf"^{checkpoint}/preprocessor_config\.json{message}"):
        load_image_processor(ModelArguments(model_name_or_path=str(checkpoint)), "imagenet32", tiny_config())


def test_a_foreign_image_processor_stops_fine_tuning_before_training(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    ViTImageProcessor().save_pretrained(checkpoint)  # it used to train on 224x224 crops, silently
    with pytest.raises(
        ValueError, match=rf"^{checkpoint}/preprocessor_config\.json: image_processor_type='ViTImageProcessor'"
    ):
        fine_tune(tmp_path / "run", "--model_name_or_path", str(checkpoint), "--max_steps", "1")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_checkpoint_without_an_image_processor_uses_the_presets(tmp_path, pretrained):
    checkpoint = copy_checkpoint(pretrained, tmp_path / "checkpoint")
    (checkpoint / "preprocessor_config.json").unlink()
    config = SelfieConfig.from_pretrained(pretrained)
    processor = load_image_processor(ModelArguments(model_name_or_path=str(checkpoint)), "cifar10", config)
    assert processor.image_mean == pytest.approx([0.4914, 0.4822, 0.4465])  # the cifar10 preset's
    config_file = ModelArguments(config_name=str(pretrained / "config.json"))  # a config file has no image processor
    assert load_image_processor(config_file, "cifar10", config).image_mean == pytest.approx([0.4914, 0.4822, 0.4465])


def test_an_image_processor_of_another_size_than_the_model_is_refused_before_training(tmp_path, pretrained):
    message = r"crops images to 32x32, but the model takes 64x64 images \(changed image_size with --config_overrides"
    with pytest.raises(ValueError, match=rf"^{pretrained}/preprocessor_config\.json {message}"):
        pretrain(
            tmp_path / "run",
            "--model_name_or_path",
            str(pretrained),
            "--max_steps",
            "1",
            "--ignore_mismatched_sizes",
            "--config_overrides",
            "image_size=64,hidden_size=32,num_attention_heads=4,num_hidden_layers=1",
        )
    with pytest.raises(ValueError, match=rf"^the cifar10 preset's image processor {message}"):
        pretrain(
            tmp_path / "run",
            "--preset",
            "cifar10",
            "--max_steps",
            "1",
            "--config_overrides",
            "image_size=64,hidden_size=32,num_attention_heads=4,num_hidden_layers=1",
        )
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max_unreadable_fraction", "nan"], r"^--max_unreadable_fraction nan must be in \[0, 1\]\.$"),
        (["--max_unreadable_fraction", "-0.1"], r"^--max_unreadable_fraction -0\.1 must be in \[0, 1\]\.$"),
        (["--channel_drop_prob", "7"], r"^--channel_drop_prob 7\.0 must be in \[0, 1\]\.$"),
        (["--train_val_split", "1"], r"^--train_val_split 1\.0 must be in \(0, 1\)\.$"),
        (["--max_eval_samples", "-5"], r"^--max_eval_samples -5 must be at least 0\.$"),
    ],
)
def test_bad_data_flags_are_refused_before_anything_runs(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        pretrain(tmp_path / "run", "--max_steps", "1", *flags)
    assert not (tmp_path / "run").exists()  # refused while the flags are parsed
