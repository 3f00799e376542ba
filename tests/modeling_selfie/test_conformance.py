"""The battery that transformers runs on each of its models, for the three Selfie models and both classifier heads.

Every test runs on tiny configs (`tests.utils.tiny_config`) with weights moved off their initialisation (`perturbed`),
so that the residual branches (which start at zero) and the BatchNorm statistics take part in what is compared.
"""

import copy
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from safetensors.torch import load_file
from timm.layers import BlurPool2d
from timm.models.resnet import BasicBlock, Bottleneck
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_selfie import SelfieForImageClassification, SelfieForMaskedPatchPrediction, SelfieModel
from modeling_selfie.modeling_selfie import NORM_LAYER_TYPES, SelfieAttentionLayer, SelfieAttentionPooling
from tests.utils import fixed_mask, perturbed, tiny_config


# The four models: the class and what its config sets.
VARIANTS = {
    "base": (SelfieModel, {}),
    "pretraining": (SelfieForMaskedPatchPrediction, {}),
    # SplitMask's objective: both halves fill in each other, and the image-level contrastive head.
    "split_pretraining": (
        SelfieForMaskedPatchPrediction,
        {"masking_strategy": "split", "image_contrastive_weight": 0.5},
    ),
    "resnet_head": (SelfieForImageClassification, {"classifier_head": "resnet"}),
    "attention_head": (SelfieForImageClassification, {"classifier_head": "attention_pooling"}),
}
# Dropout everywhere the config has it, for the tests where its being off (eval) or replayed (checkpointing) matters.
DROPOUT = {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2, "classifier_dropout_prob": 0.2}


@pytest.fixture(autouse=True)
def quiet_loading():
    # transformers prints a loading report for every checkpoint with missing or unexpected keys.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def build(variant: str, **fields):
    model_class, head_fields = VARIANTS[variant]
    config = tiny_config(**head_fields, **fields)
    return perturbed(model_class(config)), config


def model_inputs(model, config, batch_size: int = 2) -> dict:
    """Seeded images, and a fixed mask for the models that take one (the pretraining model draws one otherwise)."""
    generator = torch.Generator().manual_seed(2)
    height, width = config.image_height_width
    inputs = {"pixel_values": torch.randn(batch_size, config.num_channels, height, width, generator=generator)}
    if not isinstance(model, SelfieForImageClassification):
        inputs["bool_masked_pos"] = fixed_mask(config, batch_size)
    return inputs


def assert_same_outputs(actual, expected, exact: bool = True, **tolerances):
    """Two ModelOutputs (or tuples) hold the same fields, equal (or close) tensor by tensor."""
    if isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys())
        actual, expected = actual.to_tuple(), expected.to_tuple()
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        if isinstance(want, tuple):
            assert_same_outputs(got, want, exact, **tolerances)
        elif exact:
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **tolerances)


def assert_same_state(model, other):
    state, other_state = model.state_dict(), other.state_dict()
    assert state.keys() == other_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, other_state[name]), name


def first_output(model, outputs) -> torch.Tensor:
    if isinstance(model, SelfieModel):
        return outputs.pooler_output
    return outputs.logits


# Save and load


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one file", "sharded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_give_the_same_model(tmp_path, variant, max_shard_size):
    model, config = build(variant)
    model.eval()
    model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))

    shards = sorted(tmp_path.glob("*.safetensors"))
    if max_shard_size:
        assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert [shard.name for shard in shards] == ["model.safetensors"]
    saved = {name: tensor for shard in shards for name, tensor in load_file(shard).items()}
    assert saved.keys() == model.state_dict().keys()  # every tensor once, in one shard or another

    reloaded = type(model).from_pretrained(tmp_path)
    assert not reloaded.training  # from_pretrained gives a model in eval mode, as transformers does
    assert {**reloaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    assert_same_state(model, reloaded)
    inputs = model_inputs(model, config)
    assert_same_outputs(reloaded(**inputs, output_hidden_states=True), model(**inputs, output_hidden_states=True))


# Outputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_return_dict_false_gives_the_model_output_fields_as_a_tuple(variant):
    model, config = build(variant)
    model.eval()
    inputs = model_inputs(model, config)
    if isinstance(model, SelfieForImageClassification):
        inputs["labels"] = torch.tensor([2, 0])  # a loss first in the tuple
    output = model(**inputs, output_hidden_states=True)
    fields = [name for name, value in output.items() if value is not None]
    assert fields[0] == ("last_hidden_state" if variant == "base" else "loss") and fields[-1] == "hidden_states"

    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_same_outputs(as_tuple, tuple(output[name] for name in fields))
    # The config's `return_dict` is the default, as in transformers.
    model.config.return_dict = False
    assert_same_outputs(model(**inputs, output_hidden_states=True), as_tuple)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_count_and_shapes(variant):
    model, config = build(variant)
    model.eval()
    inputs = model_inputs(model, config)
    batch, layers, width = 2, config.num_hidden_layers, config.hidden_size
    plain = model(**inputs)
    assert plain.hidden_states is None
    output = model(**inputs, output_hidden_states=True)

    # P's stage-3 map of a 32x32 image through the CIFAR stem: strides 1, 1, 2, 2; 32 * 4 channels (bottlenecks).
    stage3 = (batch, 128, 8, 8)
    if variant in ("base", "pretraining", "split_pretraining"):  # A's first run: over the visible patches
        visible = config.num_patches - config.num_masked_patches
        expected = [(batch, 1 + visible, width)] * (layers + 1)  # A's input (u0 first), then each layer's output
    elif variant == "resnet_head":
        expected = [stage3, (batch, 256, 4, 4)]  # then stage 4's map
    else:
        expected = [stage3] + [(batch, 1 + 8 * 8, width)] * (layers + 1)  # then A over every cell of the map
    assert [tuple(state.shape) for state in output.hidden_states] == expected

    # Asking for them changes nothing else.
    assert_same_outputs(tuple(value for key, value in output.items() if key != "hidden_states"), plain.to_tuple())
    if variant == "base":  # the last hidden state is the last layer's output, layer-normed
        torch.testing.assert_close(model.attention_pooling.norm(output.hidden_states[-1]), output.last_hidden_state)


# Determinism and batching


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_mode_is_deterministic_and_training_mode_is_not(variant):
    model, config = build(variant, **DROPOUT)
    inputs = model_inputs(model, config)
    model.eval()
    first, second = model(**inputs, output_hidden_states=True), model(**inputs, output_hidden_states=True)
    assert_same_outputs(second, first)
    # Not vacuous: the same model in training mode draws other dropout masks each call.
    model.train()
    outputs = [first_output(model, model(**inputs)) for _ in range(2)]
    assert not torch.equal(*outputs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batch_gives_what_its_images_give_one_by_one(variant):
    model, config = build(variant)
    model.eval()
    batch = model_inputs(model, config, batch_size=3)
    together = model(**batch, output_hidden_states=True)
    alone = [
        model(**{name: value[index : index + 1] for name, value in batch.items()}, output_hidden_states=True)
        for index in range(3)
    ]
    tolerances = {"rtol": 1e-4, "atol": 1e-5}
    contrastive = together.get("image_contrastive_loss") is not None
    if contrastive:
        # The one term that compares images: an image alone has no negatives (its loss is 0), in the batch it has.
        assert all(output.image_contrastive_loss == 0 for output in alone)
        assert together.image_contrastive_loss > 0.1
        torch.testing.assert_close(
            together.loss,
            together.patch_selection_loss + config.image_contrastive_weight * together.image_contrastive_loss,
        )
    for name, value in together.items():
        if name in ("loss", "image_contrastive_loss") and contrastive:
            continue  # checked above
        if name in ("loss", "accuracy", "patch_selection_loss"):  # means over the batch (as many positions an image)
            torch.testing.assert_close(value, torch.stack([output[name] for output in alone]).mean(), **tolerances)
        elif name == "hidden_states":
            for layer, state in enumerate(value):
                torch.testing.assert_close(state, torch.cat([output[name][layer] for output in alone]), **tolerances)
        else:
            torch.testing.assert_close(value, torch.cat([output[name] for output in alone]), **tolerances)


# Loading in other precisions and placements


@pytest.mark.parametrize("variant", VARIANTS)
def test_loading_in_bfloat16(tmp_path, variant):
    model, config = build(variant)
    model.eval().save_pretrained(tmp_path)
    half = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    for name, tensor in half.state_dict().items():
        expected = torch.int64 if name.endswith("num_batches_tracked") else torch.bfloat16
        assert tensor.dtype == expected, name
        torch.testing.assert_close(tensor, model.state_dict()[name].to(expected), rtol=0, atol=0)  # the rounding

    inputs = model_inputs(model, config)
    full_precision = first_output(model, model(**inputs))
    with torch.no_grad():
        output = first_output(half, half(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}))
    assert output.dtype == torch.bfloat16 and output.shape == full_precision.shape
    # bfloat16 keeps 8 bits of mantissa: close to the float32 outputs, relative to their scale.
    scale = full_precision.abs().max().item()
    torch.testing.assert_close(output.float(), full_precision, rtol=0, atol=0.05 * scale)


# What a device map must not cut: a residual block adds its input to its branch's output, and the attention pooling
# network joins u0 (its own parameter) to the tokens; parts on two devices would meet in one operation.
WHOLE = (BasicBlock, Bottleneck, SelfieAttentionPooling)


def blocks_cut_by(device_map: dict, model) -> list[str]:
    """The residual blocks and attention pooling networks that the device map places part by part."""
    whole = [name for name, module in model.named_modules() if isinstance(module, WHOLE)]
    assert whole
    return [name for name in whole if any(key.startswith(name + ".") for key in device_map)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_loading_with_device_map_auto(tmp_path, variant):
    model, config = build(variant)
    model.eval().save_pretrained(tmp_path / "checkpoint")
    inputs = model_inputs(model, config)
    expected = model(**inputs)

    # On a machine without an accelerator, "auto" puts everything on the CPU.
    placed = type(model).from_pretrained(tmp_path / "checkpoint", device_map="auto")
    assert {tensor.device.type for tensor in placed.state_dict().values()} == {"cpu"}
    assert_same_state(model, placed)
    assert_same_outputs(placed(**inputs), expected)

    # With too little memory "auto" offloads part of the model (to other devices, the CPU or the disk), and must cut
    # it only between modules that run on their own: never inside a residual block or the attention pooling network.
    size = compute_module_sizes(model)[""]
    for share in range(5, 100, 5):
        device_map = infer_auto_device_map(
            model, max_memory={"cpu": size * share // 100}, no_split_module_classes=model._no_split_modules
        )
        assert blocks_cut_by(device_map, model) == [], f"{share}% of the model's size"
    # (Less than the whole, but more than its largest block, which accelerate keeps room for: the resnet head's
    # stage 4 is most of that model.)
    budget = int(0.9 * size)
    offloaded = type(model).from_pretrained(
        tmp_path / "checkpoint",
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(tmp_path / "offload"),
    )
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    assert blocks_cut_by(offloaded.hf_device_map, model) == []
    assert_same_outputs(offloaded(**inputs), expected)


# Initialisation


# Backbones whose layers differ: BasicBlocks, ECA attention (a Conv1d), blur pooling (a filter in a non-persistent
# buffer); and the three norms.
BACKBONES = {
    "resnet50 batchnorm": {},
    "resnet50 layernorm": {"backbone_norm": "layernorm"},
    "resnet50 groupnorm": {"backbone_norm": "groupnorm"},
    "resnet18": {"backbone": "resnet18"},
    "ecaresnet26t": {"backbone": "ecaresnet26t"},
    "resnetblur50": {"backbone": "resnetblur50"},
}


def float_tensors(module, recurse: bool = True) -> list[torch.Tensor]:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return [tensor for tensor in tensors if tensor.is_floating_point()]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_init_weights_initialises_every_parameter(variant, backbone):
    model_class, head_fields = VARIANTS[variant]
    model = model_class(tiny_config(**head_fields, **BACKBONES[backbone]))
    assert all(torch.isfinite(tensor).all() for tensor in float_tensors(model))

    # transformers builds a model on the meta device and leaves each tensor that a checkpoint lacks as uninitialised
    # memory, for `_init_weights` to set: every module that holds tensors of its own must be one that it knows.
    # (No module needs its parent here: the one thing a parent sets, the zero scale of a residual branch's last norm,
    # `initialize_weights` sets after `_init_weights`, and is checked below.)
    unknown = set()
    for module in model.modules():
        tensors = float_tensors(module, recurse=False)
        with torch.no_grad():
            for tensor in tensors:
                tensor.fill_(math.nan)
        model._init_weights(module)
        if any(torch.isnan(tensor).any() for tensor in tensors):
            unknown.add(type(module).__name__)
    assert not unknown, f"_init_weights leaves the tensors of {sorted(unknown)} as it finds them"

    # The whole model, the way transformers initialises the keys that a checkpoint lacks.
    with torch.no_grad():
        for tensor in float_tensors(model):
            tensor.fill_(math.nan)
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    assert all(torch.isfinite(tensor).all() for tensor in float_tensors(model))
    # What is not drawn at random is as in a fresh model: the norms (the last scale of every residual branch at
    # zero) and their statistics, the blur filters.
    fresh = dict(model_class(model.config).named_modules())
    for name, module in model.named_modules():
        if isinstance(module, (*NORM_LAYER_TYPES, BlurPool2d)):
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, fresh[name].state_dict()[key]), f"{name}.{key}"


@pytest.fixture
def poisoned_memory(monkeypatch):
    """transformers builds the model on the meta device, then gives every tensor that the checkpoint lacks (and every
    non-persistent buffer) uninitialised memory, `torch.empty_like`, for `_init_weights` to set: here NaN, so that
    whatever it misses shows (real uninitialised memory may hold anything, a previous tensor's values too)."""
    empty_like = torch.empty_like

    def nan_like(*args, **kwargs):
        tensor = empty_like(*args, **kwargs)
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty_like", nan_like)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_loading_initialises_what_the_checkpoint_lacks(tmp_path, backbone, poisoned_memory):
    config = tiny_config(**BACKBONES[backbone])
    pretrained = perturbed(SelfieForMaskedPatchPrediction(config))
    pretrained.save_pretrained(tmp_path)
    classifier, info = SelfieForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"layer4", "classifier"}

    assert all(torch.isfinite(tensor).all() for tensor in float_tensors(classifier))
    fresh = SelfieForImageClassification(config)
    for name, module in classifier.named_modules():
        if isinstance(module, BlurPool2d):  # a non-persistent buffer: in no checkpoint, never "missing"
            assert torch.equal(module.filt, fresh.get_submodule(name).filt), name
        if isinstance(module, torch.nn.Conv1d) and name.startswith("layer4."):  # missing: PyTorch's init
            bound = 1 / math.sqrt(module.weight[0].numel())
            assert module.weight.abs().max() <= bound and module.weight.std() > 0, name
    for name, tensor in pretrained.state_dict().items():
        if name.startswith("selfie.patch_network."):
            assert torch.equal(classifier.state_dict()[name], tensor), name


# Loading the checkpoint of one model into another


def group(key: str) -> str:
    """The part of the model that a key belongs to: `selfie.<part>` or the top-level module."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "selfie" else parts[0]


A_PARTS = ("patch_projection", "position_embeddings", "attention_pooling")  # what the resnet head lacks
# (checkpoint, model) -> (the parts reported missing, in the model's names; unexpected, in the checkpoint's;
# mismatched in shape, loaded with `ignore_mismatched_sizes=True`).
CROSS_LOADING = {
    ("base", "pretraining"): (set(), set(), set()),
    ("base", "resnet_head"): ({"layer4", "classifier"}, set(A_PARTS), set()),
    ("base", "attention_head"): ({"classifier"}, set(), set()),
    ("pretraining", "base"): (set(), set(), set()),
    ("pretraining", "resnet_head"): ({"layer4", "classifier"}, {f"selfie.{part}" for part in A_PARTS}, set()),
    ("pretraining", "attention_head"): ({"classifier"}, set(), set()),
    # The contrastive head is pretraining's alone.
    ("split_pretraining", "base"): (set(), {"image_contrastive"}, set()),
    ("split_pretraining", "resnet_head"): (
        {"layer4", "classifier"},
        {"image_contrastive", *(f"selfie.{part}" for part in A_PARTS)},
        set(),
    ),
    ("split_pretraining", "attention_head"): ({"classifier"}, {"image_contrastive"}, set()),
    # ("resnet_head", "base") is refused: a base model without its attention pooling network would output random
    # features (tests/modeling_selfie/test_checkpoints.py).
    ("resnet_head", "pretraining"): ({f"selfie.{part}" for part in A_PARTS}, {"layer4", "classifier"}, set()),
    # Both heads have a classifier, of other widths (stage 4's 256 channels, A's 32).
    ("resnet_head", "attention_head"): ({f"selfie.{part}" for part in A_PARTS}, {"layer4"}, {"classifier.weight"}),
    ("attention_head", "base"): (set(), {"classifier"}, set()),
    ("attention_head", "pretraining"): (set(), {"classifier"}, set()),
    ("attention_head", "resnet_head"): (
        {"layer4"},
        {f"selfie.{part}" for part in A_PARTS},
        {"classifier.weight"},
    ),
}


def renamed(key: str, checkpoint: str, model: str) -> str:
    """A checkpoint's key as the model names it (base_model_prefix "selfie")."""
    if checkpoint == "base" and model != "base":
        return f"selfie.{key}"
    if checkpoint != "base" and model == "base":
        return key.removeprefix("selfie.")
    return key


@pytest.mark.parametrize(("checkpoint", "target"), CROSS_LOADING)
def test_loading_one_model_into_another_reports_what_it_lacks_and_leaves(
    tmp_path, checkpoint, target, poisoned_memory
):
    source, config = build(checkpoint)
    source.save_pretrained(tmp_path)
    missing_parts, unexpected_parts, mismatched = CROSS_LOADING[checkpoint, target]
    model_class, head_fields = VARIANTS[target]
    if mismatched:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            model_class.from_pretrained(tmp_path, **head_fields)
    model, info = model_class.from_pretrained(
        tmp_path, **head_fields, output_loading_info=True, ignore_mismatched_sizes=bool(mismatched)
    )
    assert type(model) is model_class

    # Exactly the keys of those parts: every key of the model is loaded or reported missing, every key of the
    # checkpoint is loaded or reported unexpected.
    model_keys, checkpoint_keys = set(model.state_dict()), set(source.state_dict())
    assert info["missing_keys"] == {key for key in model_keys if group(key) in missing_parts}
    assert info["unexpected_keys"] == {key for key in checkpoint_keys if group(key) in unexpected_parts}
    assert {key for key, *_ in info["mismatched_keys"]} == mismatched
    assert not info["error_msgs"]

    model_state = model.state_dict()
    for key, tensor in source.state_dict().items():
        if key not in info["unexpected_keys"] and key not in mismatched:
            assert torch.equal(model_state[renamed(key, checkpoint, target)], tensor), key
    assert all(torch.isfinite(tensor).all() for tensor in float_tensors(model))


# torch.export


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_export_of_the_eval_forward(variant):
    model, config = build(variant)
    model.eval()
    inputs = model_inputs(model, config)
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic_shapes = {name: {0: batch} for name in inputs}
    exported = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes).module()
    tolerances = {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        assert_same_outputs(exported(**inputs), model(**inputs), exact=False, **tolerances)
        other_batch = model_inputs(model, config, batch_size=3)  # the batch size is not baked in
        assert_same_outputs(exported(**other_batch), model(**other_batch), exact=False, **tolerances)
        if "bool_masked_pos" in inputs:  # the mask check is part of the exported graph
            wrong = inputs["bool_masked_pos"].clone()
            wrong[0] = False
            with pytest.raises(RuntimeError, match=f"exactly num_masked_patches={config.num_masked_patches}"):
                exported(**{**inputs, "bool_masked_pos": wrong})


# Activation (gradient) checkpointing


@contextmanager
def call_counts(modules: dict):
    """How often each of some modules starts to run: twice a step where activation checkpointing recomputes it.
    (Started, not finished: the recomputation stops as soon as it has what the backward needs.)"""
    counts = dict.fromkeys(modules, 0)

    def count(name):
        counts[name] += 1

    handles = [module.register_forward_pre_hook(lambda *_, name=name: count(name)) for name, module in modules.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def watched_modules(model) -> dict:
    """The stem (never checkpointed), the first block of some ResNet stages, and each Transformer layer."""
    selfie = model if isinstance(model, SelfieModel) else model.selfie
    network = selfie.patch_network
    modules = {"stem": network.conv1, "stage1": network.layer1[0].conv1, "stage3": network.layer3[0].conv1}
    if isinstance(model, SelfieForImageClassification) and model.layer4 is not None:
        modules["stage4"] = model.layer4[0].conv1
    if selfie.attention_pooling is not None:
        for index, layer in enumerate(selfie.attention_pooling.layers):
            modules[f"attention layer {index}"] = layer.norm1  # its first module
    return modules


def training_step(model, config):
    """One forward and backward in training mode, from a fixed seed (for the dropout masks)."""
    model.train()
    model.zero_grad()
    inputs = model_inputs(model, config)
    if isinstance(model, SelfieForImageClassification):
        inputs["labels"] = torch.tensor([0, 2])
    torch.manual_seed(5)
    with call_counts(watched_modules(model)) as counts:
        output = model(**inputs)
        loss = output.pooler_output.square().mean() if isinstance(model, SelfieModel) else output.loss
        forward_counts = dict(counts)
        loss.backward()
    return loss, forward_counts, counts


def checkpointing_layers(model) -> list:
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_goes_through_transformers_checkpointing_layers(variant):
    """transformers checks that a model's checkpointing is built from `GradientCheckpointingLayer`s: every residual
    block of the ResNet and every layer of A is one, and no other module carries a checkpointing switch."""
    model, _ = build(variant)
    model.activation_checkpointing_enable()
    switched = {name for name, module in model.named_modules() if getattr(module, "gradient_checkpointing", False)}
    layers = {name for name, module in model.named_modules() if isinstance(module, GradientCheckpointingLayer)}
    residual_blocks = {name for name, module in model.named_modules() if isinstance(module, (BasicBlock, Bottleneck))}
    attention_layers = {name for name, module in model.named_modules() if isinstance(module, SelfieAttentionLayer)}
    assert residual_blocks
    assert switched == layers == residual_blocks | attention_layers


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(variant, use_reentrant):
    model, config = build(variant, **DROPOUT)  # dropout: checkpointing must replay the same masks
    assert model.supports_gradient_checkpointing
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_activation_checkpointing

    loss, forward_counts, counts = training_step(model, config)
    checkpointed_loss, checkpointed_forward_counts, checkpointed_counts = training_step(checkpointed, config)

    # Checkpointing is on: in the backward every block and Transformer layer ran again, the stem did not. (The split
    # objective runs A twice a forward, once a half.)
    runs = {name: 2 if name.startswith("attention") and config.masking_strategy == "split" else 1 for name in counts}
    assert forward_counts == checkpointed_forward_counts == counts == runs
    assert checkpointed_counts == {name: runs[name] * (1 if name == "stem" else 2) for name in counts}

    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    gradients = dict(checkpointed.named_parameters())
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(gradients[name].grad, parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The recomputation in the backward runs the blocks in training mode again, but the BatchNorm running statistics
    # are updated once a step, as without checkpointing (a plain recomputation would update them twice).
    assert_same_state(checkpointed, model)


def test_gradient_checkpointing_switches_on_and_off_and_skips_where_there_is_no_backward():
    model, config = build("attention_head")
    with warnings.catch_warnings():  # the name that transformers 5 deprecates for activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointing_layers(model))
    once = {"stem": 1, "stage1": 1, "stage3": 1, "attention layer 0": 1, "attention layer 1": 1}

    # Only a training step with gradients recomputes: evaluation, or training without gradients, runs as usual.
    model.eval()
    with call_counts(watched_modules(model)) as counts:
        model(**model_inputs(model, config)).logits.sum().backward()
    assert counts == once
    model.train()
    with call_counts(watched_modules(model)) as counts, torch.no_grad():
        model(**model_inputs(model, config))
    assert counts == once

    # Every other layer, as transformers' `every_n_layers` says, counting the residual blocks (one a stage) first:
    # stage 1's block, stage 3's and A's second layer.
    model.activation_checkpointing_enable(every_n_layers=2)
    _, _, counts = training_step(model, config)
    assert counts == {"stem": 1, "stage1": 2, "stage3": 2, "attention layer 0": 1, "attention layer 1": 2}

    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    _, _, counts = training_step(model, config)
    assert counts == once
