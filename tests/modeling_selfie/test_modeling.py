import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from modeling_selfie import (
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
    random_patch_mask,
)
from modeling_selfie.modeling_selfie import SelfieQueries
from tests.utils import fixed_mask, images, tiny_config


GRIDS = {
    "4x4 on 32x32, cifar stem": {"image_size": 32, "patch_size": 8, "stem": "cifar", "num_masked_patches": 4},
    "7x7 on 224x224, imagenet stem": {
        "image_size": 224,
        "patch_size": 32,
        "stem": "imagenet",
        "num_masked_patches": 12,
    },
    "4x8 on 32x64, cifar stem": {"image_size": [32, 64], "patch_size": 8, "stem": "cifar", "num_masked_patches": 6},
}
VARIANTS = list(itertools.product(["batchnorm", "layernorm", "groupnorm"], ["factorized", "full"]))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("norm", "positions"), VARIANTS)
def test_shapes_of_all_three_models(grid, norm, positions):
    config = tiny_config(**GRIDS[grid], backbone_norm=norm, position_embedding_type=positions)
    batch, patches, masked, hidden = 2, config.num_patches, config.num_masked_patches, config.hidden_size
    pixel_values = images(config, batch)

    base = SelfieModel(config)
    everything = base(pixel_values, output_hidden_states=True)
    assert everything.patch_embeddings.shape == (batch, patches, hidden)
    assert everything.last_hidden_state.shape == (batch, 1 + patches, hidden)
    assert everything.pooler_output.shape == (batch, hidden)
    assert len(everything.hidden_states) == config.num_hidden_layers + 1
    visible = base(pixel_values, bool_masked_pos=fixed_mask(config, batch))
    assert visible.last_hidden_state.shape == (batch, 1 + patches - masked, hidden)

    pretraining = SelfieForMaskedPatchPrediction(config)(pixel_values)
    assert pretraining.logits.shape == (batch, masked, masked)
    assert pretraining.bool_masked_pos.shape == (batch, patches)
    assert pretraining.bool_masked_pos.sum(dim=1).tolist() == [masked] * batch
    assert torch.isfinite(pretraining.loss) and pretraining.loss.ndim == 0
    assert 0 <= pretraining.accuracy.item() <= 1

    for head in ("resnet", "attention_pooling"):
        classifier = SelfieForImageClassification(tiny_config(**GRIDS[grid], classifier_head=head, backbone_norm=norm))
        output = classifier(pixel_values, labels=torch.tensor([0, 2]))
        assert output.logits.shape == (batch, 3)
        assert torch.isfinite(output.loss)


def test_patch_embeddings_are_p_on_each_patch_alone_in_grid_order():
    config = tiny_config(image_size=[32, 64], hidden_size=128)  # P's width: no projection
    model = SelfieModel(config).eval()
    pixel_values = images(config)
    embeddings = model(pixel_values).patch_embeddings
    rows, columns = config.grid_size
    size = config.patch_size
    for row, column in itertools.product(range(rows), range(columns)):
        patch = pixel_values[:, :, row * size : (row + 1) * size, column * size : (column + 1) * size]
        expected = model.patch_network.forward_features(patch).mean(dim=(2, 3))
        torch.testing.assert_close(embeddings[:, row * columns + column], expected, rtol=1e-5, atol=1e-5)


def position_table(embeddings) -> torch.Tensor:
    """pos(r, c) = row_r + column_c, written out cell by cell."""
    rows, columns = embeddings.rows, embeddings.columns
    return torch.stack([rows[r] + columns[c] for r in range(len(rows)) for c in range(len(columns))])


@pytest.mark.parametrize(("temperature", "query_type"), [(None, "sum"), (1.0, "sum"), (None, "mlp")])
def test_loss_equals_a_plain_per_image_loop(temperature, query_type):
    config = tiny_config(score_temperature=temperature, query_type=query_type)
    model = SelfieForMaskedPatchPrediction(config).eval()
    pixel_values, mask = images(config), fixed_mask(config)
    output = model(pixel_values, bool_masked_pos=mask)
    encoded = model.selfie(pixel_values, bool_masked_pos=mask)
    positions = position_table(model.selfie.position_embeddings)
    scale = math.sqrt(config.hidden_size) if temperature is None else temperature

    losses, correct = [], 0
    for b in range(len(pixel_values)):
        hidden = [i for i in range(config.num_patches) if mask[b, i]]
        h, u = encoded.patch_embeddings[b], encoded.pooler_output[b]
        for row, position in enumerate(hidden):
            query = u + positions[position]
            if query_type == "mlp":
                query = query + model.queries.mlp(query)
            scores = torch.stack([torch.dot(query, h[j]) for j in hidden]) / scale
            torch.testing.assert_close(output.logits[b, row], scores, rtol=1e-5, atol=1e-5)
            losses.append(-torch.log_softmax(scores, dim=0)[row])
            correct += int(scores.argmax() == row)

    torch.testing.assert_close(output.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert output.accuracy.item() == pytest.approx(correct / len(losses))


@pytest.mark.parametrize("query_type", ["sum", "mlp"])
def test_only_mlp_queries_let_the_summary_say_which_patch_goes_where(query_type):
    # With u + pos_i, a change of u moves every position's score of patch j by the same <u' - u, h_j>: a bias per
    # candidate, whatever the position. Through the MLP the change depends on the position too.
    queries = SelfieQueries(tiny_config(query_type=query_type, hidden_size=16, num_attention_heads=2))
    generator = torch.Generator().manual_seed(0)
    for parameter in queries.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    summary, other_summary = torch.randn(2, 3, 16, generator=generator)
    positions, candidates = torch.randn(2, 3, 4, 16, generator=generator)
    change = (queries(other_summary, positions) - queries(summary, positions)) @ candidates.transpose(1, 2)
    across_positions = (change - change[:, :1]).abs().max().item()
    if query_type == "sum":
        assert across_positions < 1e-4
    else:
        assert across_positions > 1.0


def test_summary_is_attention_pooling_over_the_visible_patches_alone():
    config = tiny_config()
    model = SelfieModel(config).eval()
    pixel_values, mask = images(config), fixed_mask(config)
    output = model(pixel_values, bool_masked_pos=mask)
    positions = position_table(model.position_embeddings)
    for b in range(len(pixel_values)):
        visible = [i for i in range(config.num_patches) if not mask[b, i]]
        tokens = output.patch_embeddings[b, visible] + positions[visible]
        summary, _ = model.attention_pooling(tokens[None])
        torch.testing.assert_close(output.pooler_output[b], summary[0, 0], rtol=1e-5, atol=1e-5)


def replace_patch(pixel_values, config, position):
    """A copy of the images with new pixels in the patch at grid `position`."""
    changed = pixel_values.clone()
    row, column = divmod(position, config.grid_size[1])
    size = config.patch_size
    changed[:, :, row * size : (row + 1) * size, column * size : (column + 1) * size] = torch.randn(
        len(pixel_values), config.num_channels, size, size
    )
    return changed


@pytest.mark.parametrize(("norm", "mode"), [("batchnorm", "eval"), ("layernorm", "train"), ("groupnorm", "train")])
def test_changing_a_hidden_patch_changes_only_its_column(norm, mode):
    config = tiny_config(backbone_norm=norm)
    model = SelfieForMaskedPatchPrediction(config).train(mode == "train")
    pixel_values = images(config, batch_size=1)
    mask = fixed_mask(config, batch_size=1)
    hidden = mask[0].nonzero().flatten().tolist()
    before = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
    for column, position in enumerate(hidden):
        after = model(replace_patch(pixel_values, config, position), bool_masked_pos=mask, output_hidden_states=True)
        assert torch.equal(after.hidden_states[0], before.hidden_states[0])  # u0 and the visible patches
        others = [j for j in range(len(hidden)) if j != column]
        assert torch.equal(after.logits[..., others], before.logits[..., others])
        assert not torch.allclose(after.logits[..., column], before.logits[..., column])


def test_batchnorm_in_training_mode_mixes_hidden_patches_into_the_summary():
    # The pitfall SelfieModel's docstring warns about: batch statistics span hidden and visible patches.
    config = tiny_config(backbone_norm="batchnorm")
    model = SelfieModel(config).train()
    pixel_values, mask = images(config, batch_size=1), fixed_mask(config, batch_size=1)
    hidden_position = mask[0].nonzero()[0].item()
    before = model(pixel_values, bool_masked_pos=mask).pooler_output
    after = model(replace_patch(pixel_values, config, hidden_position), bool_masked_pos=mask).pooler_output
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("positions", ["factorized", "full"])
def test_gradients_reach_every_part(positions):
    config = tiny_config(position_embedding_type=positions, hidden_size=48, num_attention_heads=4, query_type="mlp")
    model = SelfieForMaskedPatchPrediction(config)
    model(images(config), bool_masked_pos=fixed_mask(config)).loss.backward()
    selfie = model.selfie
    parts = {
        "P stem": selfie.patch_network.conv1.weight,
        # The residual branches start at zero (timm's init), so their convolutions get no gradient yet; the last
        # norm of each branch and the shortcut do.
        "P stage 3 norm": selfie.patch_network.layer3[0].bn3.weight,
        "P stage 3 shortcut": selfie.patch_network.layer3[0].downsample[0].weight,
        "projection": selfie.patch_projection.weight,  # P's 128 channels -> 48
        "A": selfie.attention_pooling.layers[0].attn.qkv.weight,
        "u0": selfie.attention_pooling.summary_token,
        "query MLP": model.queries.mlp[1].fc2.weight,
        **{f"position {name}": parameter for name, parameter in selfie.position_embeddings.named_parameters()},
    }
    for name, parameter in parts.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_few_optimiser_steps_on_one_batch_lower_the_loss():
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config)
    pixel_values, mask = images(config, batch_size=8), fixed_mask(config, batch_size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(pixel_values, bool_masked_pos=mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_mask_is_drawn_per_image_when_not_given():
    config = tiny_config(image_size=64, num_masked_patches=16)  # 64 patches
    model = SelfieForMaskedPatchPrediction(config).eval()
    pixel_values = images(config, batch_size=4)
    torch.manual_seed(3)
    first = model(pixel_values).bool_masked_pos
    second = model(pixel_values).bool_masked_pos
    torch.manual_seed(3)
    assert torch.equal(model(pixel_values).bool_masked_pos, first)  # reproducible from the seed
    assert first.sum(dim=1).tolist() == [16] * 4
    assert not torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) == 4  # every image gets its own


def test_random_patch_mask_is_uniform_over_positions():
    generator = torch.Generator().manual_seed(0)
    mask = random_patch_mask(20000, 16, 4, generator=generator)
    assert mask.sum(dim=1).eq(4).all()
    torch.testing.assert_close(mask.float().mean(dim=0), torch.full((16,), 0.25), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (lambda m: m.int(), "must be a bool tensor"),
        (lambda m: m[:, :8], "must be a bool tensor of shape"),
        (lambda m: m.index_fill(1, torch.arange(16), False), r"exactly num_masked_patches=4 .* got \[0\]"),
        (lambda m: torch.cat([m[:1], torch.ones_like(m[1:])]), r"got \[4, 16\]"),
    ],
)
def test_bad_masks_are_rejected(make_mask, message):
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config)
    with pytest.raises(ValueError, match=message):
        model(images(config), bool_masked_pos=make_mask(fixed_mask(config)))


def test_images_of_the_wrong_size_are_rejected():
    config = tiny_config()
    with pytest.raises(
        ValueError, match=r"pixel_values are \(48, 48\) images but the model's image_size is \(32, 32\)"
    ):
        SelfieForMaskedPatchPrediction(config)(torch.randn(1, 3, 48, 48))


def test_classifier_loss_and_labels_behave_as_in_transformers():
    id2label = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
    config = tiny_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    assert config.num_labels == 4
    model = SelfieForImageClassification(config)
    labels = torch.tensor([3, 1])
    output = model(images(config), labels=labels)
    assert model.classifier.out_features == 4
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    assert isinstance(model(images(config), return_dict=False), tuple)


def test_classifier_accepts_other_image_sizes():
    model = SelfieForImageClassification(tiny_config(classifier_head="attention_pooling")).eval()
    assert model(torch.randn(2, 3, 48, 40)).logits.shape == (2, 3)


def test_resnet_head_is_p_then_stage4_then_pooling():
    config = tiny_config()
    model = SelfieForImageClassification(config).eval()
    pixel_values = images(config)
    features = model.layer4(model.selfie.patch_network.forward_features(pixel_values)).mean(dim=(2, 3))
    torch.testing.assert_close(model(pixel_values).logits, model.classifier(features))
    assert model.selfie.attention_pooling is None and model.selfie.position_embeddings is None


def test_p_ends_in_stage_3_also_where_timm_leaves_num_features_at_stage_4(monkeypatch):
    """timm before 1.0.31 prunes stage 4 without updating `num_features` (found on a GPU machine with timm 1.0.29:
    the projection into A was sized for stage 4 and the first step failed)."""
    prune = timm.models.resnet.ResNet.prune_intermediate_layers

    def prune_as_timm_1_0_29(resnet, *args, **kwargs):
        num_features = resnet.num_features
        kept = prune(resnet, *args, **kwargs)
        resnet.num_features = num_features
        return kept

    monkeypatch.setattr(timm.models.resnet.ResNet, "prune_intermediate_layers", prune_as_timm_1_0_29)
    config = tiny_config()
    stage_3_channels = 4 * config.backbone_kwargs["channels"][2]  # bottleneck blocks widen 4 times
    model = SelfieForMaskedPatchPrediction(config)
    assert model.selfie.patch_network.num_features == stage_3_channels
    assert model.selfie.patch_projection.in_features == stage_3_channels
    assert model(images(config)).loss.isfinite()


def test_factorized_positions_are_row_plus_column_and_resize_to_finer_grids():
    model = SelfieModel(tiny_config(image_size=[32, 64]))
    embeddings = model.position_embeddings
    assert sum(p.numel() for p in embeddings.parameters()) == (4 + 8) * 32
    torch.testing.assert_close(embeddings(), position_table(embeddings))
    assert embeddings((8, 16)).shape == (128, 32)
    full = SelfieModel(tiny_config(image_size=[32, 64], position_embedding_type="full")).position_embeddings
    assert sum(p.numel() for p in full.parameters()) == 4 * 8 * 32
    assert full((8, 16)).shape == (128, 32)


def test_fresh_resnet_is_initialised_as_timm_initialises_it():
    model = SelfieForImageClassification(tiny_config(stem="imagenet"))
    blocks = [model.selfie.patch_network.layer1[0], model.selfie.patch_network.layer3[0], model.layer4[0]]
    for block in blocks:
        assert torch.equal(block.bn3.weight, torch.zeros_like(block.bn3.weight))  # the branch starts as identity
        assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
        conv = block.conv2.weight
        fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
        assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)  # kaiming, fan-out, relu


def test_an_explicit_output_hidden_states_wins_over_the_config():
    config = tiny_config(output_hidden_states=True)
    model = SelfieModel(config).eval()
    pixel_values = images(config)
    assert len(model(pixel_values).hidden_states) == config.num_hidden_layers + 1
    assert model(pixel_values, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("head", ["resnet", "attention_pooling"])
def test_the_classifier_returns_its_hidden_states(head):
    config = tiny_config(classifier_head=head)
    model = SelfieForImageClassification(config).eval()
    pixel_values = images(config)
    assert model(pixel_values).hidden_states is None
    outputs = model(pixel_values, output_hidden_states=True)
    stage3 = model.selfie.feature_map(pixel_values)
    torch.testing.assert_close(outputs.hidden_states[0], stage3)
    if head == "resnet":
        assert len(outputs.hidden_states) == 2
        torch.testing.assert_close(
            outputs.hidden_states[1].mean(dim=(2, 3)) @ model.classifier.weight.T + model.classifier.bias,
            outputs.logits,
        )
    else:
        assert len(outputs.hidden_states) == config.num_hidden_layers + 2
        assert outputs.hidden_states[1].shape == (2, 1 + stage3.shape[2] * stage3.shape[3], config.hidden_size)
    as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == 2 and len(as_tuple[1]) == len(outputs.hidden_states)
