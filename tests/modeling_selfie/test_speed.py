"""What makes a training step fast, checked on the CPU: one graph for torch.compile (no host-side decision inside
the step, so no host-device synchronisation), patches cut in the layout the convolutions run in, channels_last
weights giving the same results."""

import pytest
import torch

from modeling_selfie import SelfieForImageClassification, SelfieForMaskedPatchPrediction
from modeling_selfie.modeling_selfie import patchify
from tests.utils import fixed_mask, images, tiny_config


@pytest.mark.parametrize("channels_last", [False, True])
def test_patchify_cuts_row_major_patches_in_the_layout_asked_for(channels_last):
    pixel_values = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    patches = patchify(pixel_values, 4, channels_last=channels_last)
    expected = torch.stack(
        [
            pixel_values[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
            for b in range(2)
            for r in range(2)
            for c in range(3)
        ]
    )
    assert torch.equal(patches, expected)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert patches.is_contiguous(memory_format=layout)


def test_channels_last_weights_give_the_same_outputs_and_checkpoints():
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config).eval()
    pixel_values, mask = images(config, 3), fixed_mask(config, 3)
    expected = model(pixel_values, bool_masked_pos=mask).logits
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(pixel_values, bool_masked_pos=mask).logits, expected)
    # The patches reach P already in P's layout: the stem convolution's input is channels_last.
    seen = {}
    model.selfie.patch_network.conv1.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    model(pixel_values, bool_masked_pos=mask)
    assert seen["x"].is_contiguous(memory_format=torch.channels_last) and not seen["x"].is_contiguous()


@pytest.mark.parametrize("with_mask", [True, False])
def test_pretraining_step_compiles_to_one_graph(with_mask):
    """`fullgraph=True` fails on any graph break, which a host-side decision on device values (a `.item()`, an `if`
    on a tensor) would cause. The eager backend traces without generating code, so the test stays quick."""
    torch._dynamo.reset()
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config)
    pixel_values, mask = images(config, 2), fixed_mask(config, 2) if with_mask else None
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    output = compiled(pixel_values, bool_masked_pos=mask)
    output.loss.backward()
    torch.manual_seed(0)
    expected = model(pixel_values, bool_masked_pos=mask)
    torch.testing.assert_close(output.loss, expected.loss)
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_classifier_step_compiles_to_one_graph():
    torch._dynamo.reset()
    config = tiny_config()
    model = SelfieForImageClassification(config)
    pixel_values, labels = images(config, 2), torch.tensor([0, 2])
    output = torch.compile(model, fullgraph=True, backend="eager")(pixel_values, labels=labels)
    output.loss.backward()
    torch.testing.assert_close(output.loss, model(pixel_values, labels=labels).loss)


def test_a_bad_mask_still_fails_inside_a_compiled_graph():
    """There the count is checked on the device (an asynchronous assertion) instead of read back by the host."""
    torch._dynamo.reset()
    config = tiny_config()
    mask = fixed_mask(config, 2)
    mask[0] = False
    compiled = torch.compile(SelfieForMaskedPatchPrediction(config), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="bool_masked_pos must hide exactly num_masked_patches=4 patches"):
        compiled(images(config, 2), bool_masked_pos=mask)
