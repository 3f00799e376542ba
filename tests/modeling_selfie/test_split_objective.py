"""SplitMask's split-and-match objective as an option of the pretraining head: the split mask, the patch selection in
both directions, the image-level contrastive term, and what each half's summary may see."""

import pytest
import torch
import torch.nn.functional as F

from modeling_selfie import SelfieConfig, SelfieForMaskedPatchPrediction
from modeling_selfie.losses import ImageContrastiveLoss
from tests.utils import fixed_mask, images, perturbed, tiny_config


def split_model(**fields) -> SelfieForMaskedPatchPrediction:
    model = perturbed(SelfieForMaskedPatchPrediction(tiny_config(masking_strategy="split", **fields)))
    return model.eval()


# The config


@pytest.mark.parametrize(("image_size", "hidden"), [(32, 8), (24, 4), (224, 24)], ids=["4x4", "3x3", "7x7"])
def test_the_split_hides_half_the_grid(image_size, hidden):
    patch_size = 32 if image_size == 224 else 8
    config = SelfieConfig(image_size=image_size, patch_size=patch_size, masking_strategy="split")
    assert config.num_masked_patches == hidden == config.num_patches // 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"masking_strategy": "split", "image_size": 32, "patch_size": 8, "num_masked_patches": 4},
            "num_masked_patches=4 must be 8",
        ),
        ({"masking_strategy": "halves"}, "masking_strategy='halves' must be one of 'random', 'split'"),
        ({"image_contrastive_weight": 0.5}, "image_contrastive_weight=0.5 needs masking_strategy='split'"),
        ({"masking_strategy": "split", "image_contrastive_weight": -1}, "image_contrastive_weight=-1 must be"),
        ({"masking_strategy": "split", "image_size": 16, "patch_size": 16}, "needs a grid of at least 4 patches"),
        ({"contrastive_temperature": 0}, "contrastive_temperature=0 must be a positive number"),
        ({"contrastive_projection_size": 0}, "contrastive_projection_size=0 must be a positive int"),
    ],
)
def test_bad_split_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SelfieConfig(**fields)


def test_the_default_objective_is_selfie_alone():
    config = SelfieConfig()
    assert (config.masking_strategy, config.image_contrastive_weight) == ("random", 0.0)
    model = SelfieForMaskedPatchPrediction(tiny_config())
    assert model.image_contrastive is None
    output = model(images(model.config), bool_masked_pos=fixed_mask(model.config))
    assert output.reverse_logits is None and output.image_contrastive_loss is None
    assert output.loss is output.patch_selection_loss


# The mask


@pytest.mark.parametrize("image_size", [32, 24], ids=["4x4", "3x3"])
def test_the_drawn_halves_are_disjoint_and_cover_the_grid(image_size):
    model = split_model(image_size=image_size)
    config = model.config
    torch.manual_seed(0)
    mask = model(images(config, batch_size=16)).bool_masked_pos
    hidden = mask.sum(dim=1)
    assert torch.all(hidden == config.num_patches // 2)
    assert torch.all((~mask).sum(dim=1) == config.num_patches - config.num_patches // 2)
    # Every position is in exactly one half, and the halves differ from image to image.
    assert torch.all(mask ^ ~mask)
    assert len({tuple(row.tolist()) for row in mask}) > 1


# The patch selection in both directions, against a plain loop


def reference_outputs(model, pixel_values, mask):
    """The split objective written out image by image and position by position."""
    selfie, config = model.selfie, model.config
    temperature = config.hidden_size**0.5
    patch_embeddings = selfie.embed_patches(pixel_values)
    positions = selfie.position_embeddings()
    losses, hits, summaries, logits = [], [], [], {"forward": [], "reverse": []}
    for image, hidden_half in zip(patch_embeddings, mask, strict=True):
        halves = {"forward": (~hidden_half, hidden_half), "reverse": (hidden_half, ~hidden_half)}
        image_summaries = []
        for direction, (context, targets) in halves.items():
            tokens = (image + positions)[context]
            summary = selfie.attention_pooling(tokens[None])[0][0, 0]
            image_summaries.append(summary)
            candidates = image[targets]
            rows = []
            for own, position in enumerate(positions[targets]):
                scores = candidates @ (summary + position) / temperature
                losses.append(F.cross_entropy(scores[None], torch.tensor([own])))
                hits.append(float(scores.argmax() == own))
                rows.append(scores)
            logits[direction].append(torch.stack(rows))
        summaries.append(image_summaries)
    return {
        "patch_selection_loss": torch.stack(losses).mean(),  # every position of every image counts once
        "accuracy": torch.tensor(sum(hits) / len(hits)),
        "logits": torch.stack(logits["forward"]),
        "reverse_logits": torch.stack(logits["reverse"]),
        "summaries": summaries,
    }


@pytest.mark.parametrize("image_size", [32, 24], ids=["4x4 grid", "3x3 grid: halves of 5 and 4"])
def test_both_directions_match_a_loop_over_images_and_positions(image_size):
    model = split_model(image_size=image_size)
    config = model.config
    pixel_values, mask = images(config, batch_size=3), fixed_mask(config, batch_size=3)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
        expected = reference_outputs(model, pixel_values, mask)
    for name in ("patch_selection_loss", "logits", "reverse_logits"):
        torch.testing.assert_close(output[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(output.accuracy, expected["accuracy"])
    assert output.loss is output.patch_selection_loss  # no contrastive term
    # The two directions are not the same numbers (each half has its own summary and candidates).
    assert not torch.allclose(
        output.logits, output.reverse_logits[:, : output.logits.shape[1], : output.logits.shape[2]]
    )


def test_the_contrastive_term_compares_the_projected_halves_and_adds_with_its_weight():
    model = split_model(image_contrastive_weight=0.5, contrastive_temperature=0.2, contrastive_projection_size=16)
    config = model.config
    pixel_values, mask = images(config, batch_size=4), fixed_mask(config, batch_size=4)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
        expected = reference_outputs(model, pixel_values, mask)
        first, second = (torch.stack(half) for half in zip(*expected["summaries"], strict=True))
        project = model.image_contrastive.projection
        contrastive = ImageContrastiveLoss(0.2)(project(first), project(second))
    assert project[-1].out_features == 16
    torch.testing.assert_close(output.image_contrastive_loss, contrastive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.patch_selection_loss, expected["patch_selection_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, output.patch_selection_loss + 0.5 * output.image_contrastive_loss)


def test_training_reaches_the_projection_head_and_both_summaries():
    model = split_model(image_contrastive_weight=0.5).train()
    config = model.config
    model(images(config, batch_size=4), bool_masked_pos=fixed_mask(config, batch_size=4)).loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients.values())
    assert all(
        name in gradients
        for name in ("image_contrastive.projection.0.weight", "selfie.attention_pooling.summary_token")
    )


# Hidden-patch isolation, half by half


def attention_pooling_outputs(model, pixel_values, mask) -> list[torch.Tensor]:
    """What A gives at each of its runs in one forward: the visible half's, then the hidden half's."""
    outputs = []
    handle = model.selfie.attention_pooling.register_forward_hook(
        lambda module, args, output: outputs.append(output[0])
    )
    try:
        with torch.no_grad():
            model(pixel_values, bool_masked_pos=mask)
    finally:
        handle.remove()
    return outputs


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_each_half_summary_sees_only_its_own_half(norm):
    model = split_model(backbone_norm=norm, image_contrastive_weight=0.5)
    if norm == "groupnorm":  # a per-sample norm: isolation holds in training mode too
        model.train()
    config = model.config
    pixel_values, mask = images(config), fixed_mask(config)
    visible_run, hidden_run = attention_pooling_outputs(model, pixel_values, mask)

    # Pixels of each patch position, as an image-sized mask.
    patch_pixels = mask.view(-1, 1, *config.grid_size).repeat_interleave(config.patch_size, dim=2)
    patch_pixels = patch_pixels.repeat_interleave(config.patch_size, dim=3)
    hidden_changed = pixel_values + 5.0 * torch.randn_like(pixel_values) * patch_pixels
    visible_changed = pixel_values + 5.0 * torch.randn_like(pixel_values) * ~patch_pixels

    after_hidden_change = attention_pooling_outputs(model, hidden_changed, mask)
    torch.testing.assert_close(after_hidden_change[0], visible_run, rtol=0, atol=1e-6)
    assert not torch.allclose(after_hidden_change[1], hidden_run, atol=1e-3)
    after_visible_change = attention_pooling_outputs(model, visible_changed, mask)
    torch.testing.assert_close(after_visible_change[1], hidden_run, rtol=0, atol=1e-6)
    assert not torch.allclose(after_visible_change[0], visible_run, atol=1e-3)
