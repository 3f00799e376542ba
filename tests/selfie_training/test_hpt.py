"""Hierarchical pretraining (HPT): stage after stage, from timm weights, norm-only stages, and the recorded chain."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from modeling_selfie import SelfieConfig, SelfieForImageClassification, SelfieForMaskedPatchPrediction
from selfie_training import pretraining
from selfie_training.checkpoints import TRAINING_STAGES_FILE, load_training_stages
from selfie_training.model_card import describe_stages
from selfie_training.runner import ModelArguments, train_and_evaluate, training_stages
from selfie_training.timm_weights import load_timm_weights
from tests.utils import QUIET_FLAGS, TINY_MODEL, TINY_MODEL_FLAGS, class_images, fine_tune, pretrain, tiny_config


STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "8"]
TINY_BACKBONE_KWARGS = json.loads(TINY_MODEL["backbone_kwargs"])  # the scripts' tiny resnet18


def image_folder(root: Path, seed: int) -> Path:
    for index, (image, label) in enumerate(class_images(3, 12, seed=seed)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class_{label}" / f"{index}.png")
    return root


def timm_checkpoint(path: Path, **kwargs) -> dict:
    """A timm ResNet of the tiny scripts' architecture, its weights and BatchNorm statistics moved off any
    initialisation, saved to `path` (safetensors or torch, by the suffix); returns its state dict."""
    model = timm.create_model(TINY_MODEL["backbone"], **{**TINY_BACKBONE_KWARGS, **kwargs})
    generator = torch.Generator().manual_seed(0)
    state_dict = model.state_dict()
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)  # positive: valid running variances
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"state_dict": state_dict}, path)  # as timm's train.py saves
    return state_dict


def build_pretraining(output_dir: Path, *flags: str):
    """run_pretraining.py's trainer, before training: what the stage starts from."""
    return pretraining.build_trainer(
        ["--output_dir", str(output_dir), "--do_train", "--do_eval", *TINY_MODEL_FLAGS, *QUIET_FLAGS, *flags]
    )


def pretraining_stage(output_dir: Path, *flags: str) -> tuple[dict, object]:
    """One run_pretraining.py stage: the weights it started from, and its trainer after training."""
    trainer, *rest = build_pretraining(output_dir, *flags, *STEPS)
    start = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    train_and_evaluate(trainer, *rest, None)  # a fresh --output_dir: no checkpoint to resume
    return start, trainer


def read_config(checkpoint: Path) -> SelfieConfig:
    return SelfieConfig.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """timm weights -> pretraining on `base` -> pretraining on `target` -> norm-only pretraining on `target`,
    with the weights each stage started from and the trainer of the norm-only stage."""
    root = tmp_path_factory.mktemp("hpt")
    base, target = image_folder(root / "base", seed=0), image_folder(root / "target", seed=1)
    timm_file = root / "resnet18.safetensors"
    timm_weights = timm_checkpoint(timm_file)

    stage1_start, _ = pretraining_stage(
        root / "stage1", "--backbone_weights", str(timm_file), "--train_dir", str(base)
    )
    stage2_start, _ = pretraining_stage(
        root / "stage2", "--model_name_or_path", str(root / "stage1"), "--train_dir", str(target)
    )
    _, norm_only = pretraining_stage(
        root / "stage3", "--model_name_or_path", str(root / "stage2"), "--train_norm_only", "--train_dir", str(target)
    )
    return {
        "root": root,
        "base": base,
        "target": target,
        "timm_file": timm_file,
        "timm_weights": timm_weights,
        "stage1_start": stage1_start,
        "stage2_start": stage2_start,
        "norm_only_trainer": norm_only,
    }


def test_the_first_stage_starts_p_from_the_timm_file(chain):
    start, prefix = chain["stage1_start"], "selfie.patch_network."
    patch_network = {name.removeprefix(prefix): tensor for name, tensor in start.items() if name.startswith(prefix)}
    assert patch_network.keys() == {name for name in chain["timm_weights"] if not name.startswith(("layer4.", "fc."))}
    for name, tensor in patch_network.items():
        if name == "conv1.weight":  # ImageNet's 7x7 stem does not fit the CIFAR stem, which starts fresh
            assert chain["timm_weights"][name].shape == (64, 3, 7, 7) and tensor.shape == (64, 3, 3, 3)
        else:
            assert torch.equal(tensor, chain["timm_weights"][name]), name


def test_a_stage_starts_from_every_weight_of_the_last_and_trains_them_further(chain):
    stage1 = load_file(chain["root"] / "stage1" / "model.safetensors")
    start = chain["stage2_start"]
    assert start.keys() == stage1.keys()
    parts = {"selfie.patch_network", "selfie.attention_pooling", "selfie.position_embeddings"}
    assert {".".join(name.split(".")[:2]) for name in stage1} == parts
    for name, tensor in stage1.items():
        assert torch.equal(start[name], tensor), name  # P, A and the embeddings all carried over ...
    stage2 = load_file(chain["root"] / "stage2" / "model.safetensors")
    for name, tensor in stage1.items():
        assert not torch.equal(stage2[name], tensor), name  # ... and all trained further on the new data


def test_norm_only_stage_trains_the_norms_of_p_and_nothing_else(chain):
    before = load_file(chain["root"] / "stage2" / "model.safetensors")
    after = load_file(chain["root"] / "stage3" / "model.safetensors")
    model = chain["norm_only_trainer"].model
    norms = {
        f"selfie.patch_network.{module_name}.{name}"
        for module_name, module in model.selfie.patch_network.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for name in module.state_dict()
    }
    assert len(norms) == 10 * 5  # stem + 3 stages x (2 block norms + 1 downsample norm); 5 tensors each
    for name in before:
        if name in norms:  # scales, shifts, running statistics and their step counts
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
    # The optimizer holds the norms' scales and shifts and nothing else.
    groups = chain["norm_only_trainer"].optimizer.param_groups
    optimized = {id(parameter) for group in groups for parameter in group["params"]}
    trainable = {id(parameter) for name, parameter in model.named_parameters() if name in norms}
    assert optimized == trainable and len(trainable) == 10 * 2
    assert load_training_stages(str(chain["root"] / "stage3"))[-1] == {
        "task": "pretraining",
        "dataset": str(chain["target"]),
        "norm_only": True,
    }


def test_norm_only_logs_the_trainable_parameters(chain, caplog):
    model = SelfieForMaskedPatchPrediction.from_pretrained(chain["root"] / "stage2")
    with caplog.at_level(logging.INFO, logger="selfie_training.pretraining"):
        pretraining.train_norm_layers_only(model)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    norm_parameters = sum(
        parameter.numel()
        for module in model.selfie.patch_network.modules()
        if isinstance(module, nn.BatchNorm2d)
        for parameter in module.parameters()
    )
    assert trainable == norm_parameters > 0
    total = sum(parameter.numel() for parameter in model.parameters())
    assert f"--train_norm_only: training {trainable:,} of {total:,} parameters" in caplog.text


def test_the_chain_travels_with_the_checkpoints_into_the_cards(chain, tmp_path):
    root, base, target = chain["root"], chain["base"], chain["target"]
    classifier = tmp_path / "classifier"
    fine_tune(classifier, "--model_name_or_path", str(root / "stage3"), "--train_dir", str(target), *STEPS)
    expected = [
        {"task": "timm_weights", "weights": str(chain["timm_file"])},
        {"task": "pretraining", "dataset": str(base), "norm_only": False},
        {"task": "pretraining", "dataset": str(target), "norm_only": False},
        {"task": "pretraining", "dataset": str(target), "norm_only": True},
        {"task": "classification", "dataset": str(target)},
    ]
    assert load_training_stages(str(classifier)) == expected
    assert load_training_stages(str(root / "stage2")) == expected[:3]
    assert "training_stages" not in read_config(classifier).to_dict()  # provenance, not architecture
    chain_text = (
        f"timm resnet18 weights from {chain['timm_file']} → Selfie pretraining on {base} → Selfie pretraining on "
        f"{target} → Selfie pretraining on {target} (norm layers only)"
    )
    card = (classifier / "README.md").read_text()
    assert f"the first three stages of a ResNet, pretrained ({chain_text}), then stage 4" in card
    assert f"{chain_text} → fine-tuning on {target}" in card
    assert "fresh weights" not in card
    first_card = (root / "stage1" / "README.md").read_text()
    assert f"timm resnet18 weights from {chain['timm_file']} → Selfie pretraining on {base}\n" in first_card


def test_fresh_starts_and_eval_only_runs_add_no_stage(chain):
    stage2 = str(chain["root"] / "stage2")
    recorded = load_training_stages(stage2)
    # --config_name copies the architecture with fresh weights: no history, and no download of timm's weights.
    stage = {"task": "classification", "dataset": "d"}
    assert training_stages(ModelArguments(config_name=stage2), stage) == [stage]
    assert training_stages(ModelArguments(model_name_or_path=stage2), None) == recorded  # no training
    online = training_stages(ModelArguments(backbone_weights="timm"), None)
    assert online == [{"task": "timm_weights", "weights": "timm"}]


def test_a_checkpoint_written_with_stages_in_its_config_keeps_them(chain, tmp_path):
    """Checkpoints of earlier versions hold their stages in config.json: they load, and the chain goes on from them."""
    old = tmp_path / "old"
    shutil.copytree(chain["root"] / "stage2", old)
    stages = json.loads((old / TRAINING_STAGES_FILE).read_text())["training_stages"]
    (old / TRAINING_STAGES_FILE).unlink()
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "training_stages": stages}))
    assert load_training_stages(str(old)) == stages
    assert "training_stages" not in SelfieConfig.from_pretrained(old).to_dict()
    classifier = tmp_path / "classifier"
    fine_tune(classifier, "--model_name_or_path", str(old), "--train_dir", str(chain["target"]), *STEPS)
    assert load_training_stages(str(classifier)) == [
        *stages,
        {"task": "classification", "dataset": str(chain["target"])},
    ]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_file_starts_p_and_stage4_exactly(tmp_path, suffix):
    weights = timm_checkpoint(tmp_path / f"resnet{suffix}")
    kwargs = {"backbone": TINY_MODEL["backbone"], "backbone_kwargs": TINY_BACKBONE_KWARGS, "stem": "imagenet"}
    model = SelfieForImageClassification(tiny_config(**kwargs))
    classifier = model.classifier.weight.clone()
    load_timm_weights(model, str(tmp_path / f"resnet{suffix}"))
    stage4 = {f"layer4.{name}": tensor for name, tensor in model.layer4.state_dict().items()}
    loaded = {**model.selfie.patch_network.state_dict(), **stage4}
    assert loaded.keys() == {name for name in weights if not name.startswith("fc.")}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, weights[name]), name
    assert torch.equal(model.classifier.weight, classifier)  # ImageNet's classifier is not this model's


def test_cifar_stem_loads_a_3x3_stem_and_skips_a_7x7_one(tmp_path, caplog):
    cifar_stem = timm.create_model(TINY_MODEL["backbone"], **TINY_BACKBONE_KWARGS)
    cifar_stem.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    save_file(cifar_stem.state_dict(), tmp_path / "cifar.safetensors")
    timm_checkpoint(tmp_path / "imagenet.safetensors")
    config = tiny_config(backbone=TINY_MODEL["backbone"], backbone_kwargs=TINY_BACKBONE_KWARGS, stem="cifar")

    model = SelfieForMaskedPatchPrediction(config)
    load_timm_weights(model, str(tmp_path / "cifar.safetensors"))
    assert torch.equal(model.selfie.patch_network.conv1.weight, cifar_stem.conv1.weight)

    model = SelfieForMaskedPatchPrediction(config)
    fresh = model.selfie.patch_network.conv1.weight.clone()
    with caplog.at_level(logging.WARNING):
        load_timm_weights(model, str(tmp_path / "imagenet.safetensors"))
    assert torch.equal(model.selfie.patch_network.conv1.weight, fresh)
    assert "conv1.weight is (64, 3, 7, 7), not the CIFAR stem's (64, 3, 3, 3); the stem starts fresh" in caplog.text


class NotATensor:
    pass


def bad_timm_files(root: Path) -> list[tuple[Path, str]]:
    (root / "text.pth").write_text("not a checkpoint")
    (root / "text.safetensors").write_text("not a checkpoint")
    torch.save({"conv1.weight": NotATensor()}, root / "code.pth")  # unpickling it would need to run code
    torch.save({"conv1.weight": 3}, root / "numbers.pth")
    timm_checkpoint(root / "wide.safetensors", channels=[16, 32, 64, 128])
    return [
        (root / "missing.safetensors", r"missing\.safetensors: no such file\.$"),
        (
            root / "text.pth",
            r"text\.pth is not a safetensors file or a torch checkpoint that loads with weights_only=True",
        ),
        (
            root / "text.safetensors",
            r"text\.safetensors is not a safetensors file .*\(Error while deserializing header",
        ),
        (root / "code.pth", r"code\.pth is not a safetensors file .*non-allowlisted pickle globals"),
        (root / "numbers.pth", r"numbers\.pth holds no state dict of tensors\.$"),
        (
            root / "wide.safetensors",
            r"wide\.safetensors: tensor 'layer1\.0\.conv1\.weight' has shape \(16, 64, 3, 3\) but the "
            r"model's patch network needs \(8, 64, 3, 3\)",
        ),
    ]


def test_bad_timm_files_give_one_line_errors_naming_file_and_tensor(tmp_path):
    config = tiny_config(backbone=TINY_MODEL["backbone"], backbone_kwargs=TINY_BACKBONE_KWARGS)
    for path, message in bad_timm_files(tmp_path):
        with pytest.raises(ValueError, match=message) as error:
            load_timm_weights(SelfieForMaskedPatchPrediction(config), str(path))
        assert "\n" not in str(error.value)
    # A patch network alone (a Selfie export of a pretraining checkpoint) cannot start a classifier's stage 4.
    weights = timm_checkpoint(tmp_path / "full.safetensors")
    patch_network = {name: tensor for name, tensor in weights.items() if not name.startswith(("layer4.", "fc."))}
    save_file(patch_network, tmp_path / "p.safetensors")
    with pytest.raises(
        ValueError, match=r"p\.safetensors has no tensor 'layer4\.0\.conv1\.weight', which the model's stage 4"
    ):
        load_timm_weights(SelfieForImageClassification(config), str(tmp_path / "p.safetensors"))


def test_bad_backbone_weights_flags_fail_before_training(tmp_path, chain):
    with pytest.raises(ValueError, match=r"^--backbone_weights .*nothing\.safetensors: no such file\.$"):
        pretrain(
            tmp_path / "run",
            "--backbone_weights",
            str(tmp_path / "nothing.safetensors"),
            "--train_dir",
            str(chain["base"]),
        )
    with pytest.raises(
        ValueError, match=r"--backbone_weights timm and --model_name_or_path .* both give the starting weights"
    ):
        pretrain(tmp_path / "run", "--backbone_weights", "timm", "--model_name_or_path", str(chain["root"] / "stage1"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_backbone_weights_timm_starts_from_timms_weights_or_says_it_cannot(tmp_path, chain, monkeypatch):
    # Stands in for timm's download: "pretrained" weights are all 0.5, or the Hub cannot be reached.
    original, reachable = timm.create_model, [True]

    def create_model(name, pretrained=False, **kwargs):
        if pretrained and not reachable[0]:
            raise LocalEntryNotFoundError("Cannot find the requested files in the local cache.")
        model = original(name, **kwargs)
        for tensor in model.state_dict().values():
            if pretrained and tensor.is_floating_point():
                tensor.fill_(0.5)
        return model

    monkeypatch.setattr(timm, "create_model", create_model)
    trainer, *_ = build_pretraining(tmp_path / "run", "--backbone_weights", "timm", "--train_dir", str(chain["base"]))
    assert (trainer.model.selfie.patch_network.layer3[0].conv1.weight == 0.5).all()
    assert trainer.training_stages[0] == {"task": "timm_weights", "weights": "timm"}
    reachable[0] = False
    with pytest.raises(
        ValueError, match=r"^--backbone_weights timm: timm's resnet18 weights could not be fetched \(Cannot find"
    ):
        build_pretraining(tmp_path / "run", "--backbone_weights", "timm", "--train_dir", str(chain["base"]))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ({"task": "pretraining"}, r"training_stages=\{'task': 'pretraining'\} must be a list of dicts"),
        (["pretraining"], r"training_stages=\['pretraining'\] must be a list of dicts"),
        ([{"task": ["pretraining"]}], r"training_stages\[0\]=.* must name its 'task'"),
        ([{"dataset": "d"}], r"training_stages\[0\]=.* must name its 'task'"),
    ],
)
def test_bad_training_stages_are_refused_naming_the_file_and_entry(tmp_path, stages, message):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / TRAINING_STAGES_FILE).write_text(json.dumps({"training_stages": stages}))
    with pytest.raises(ValueError, match=rf"^{tmp_path / TRAINING_STAGES_FILE}: {message}"):
        load_training_stages(str(tmp_path))


def test_stages_of_a_later_version_load_and_show_in_the_model_card(tmp_path):
    """Provenance is forward-compatible: a checkpoint written by a later version, with a new kind of stage or a new
    field, loads, and its card names the stage by its fields."""
    stages = [
        {"task": "pretraining", "dataset": "d", "norm_only": False, "objective": "split", "crop_scale": 0.3},
        {"task": "distillation", "teacher": "t"},
        {"task": "classification", "dataset": "e"},
    ]
    path = tmp_path / TRAINING_STAGES_FILE
    path.write_text(json.dumps({"training_stages": stages}))
    assert load_training_stages(str(tmp_path)) == stages
    assert describe_stages(stages, "resnet18") == (
        "fresh weights → Selfie pretraining on d (split) → distillation (teacher: t) → fine-tuning on e"
    )
