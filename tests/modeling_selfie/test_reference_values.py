"""Outputs pinned at a fixed seed (as transformers' integration tests pin an `expected_slice`), so that a refactor
cannot change the numbers silently. A deliberate change updates the values here, and says so in its commit."""

import pytest
import torch

from modeling_selfie import SelfieForImageClassification, SelfieForMaskedPatchPrediction
from tests.utils import fixed_mask, images, tiny_config


TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # float32 on any CPU


def test_pretraining_loss_and_logits():
    torch.manual_seed(0)
    config = tiny_config()
    model = SelfieForMaskedPatchPrediction(config).eval()
    with torch.no_grad():
        outputs = model(images(config), bool_masked_pos=fixed_mask(config))
    assert outputs.loss.item() == pytest.approx(1.3863275051116943, rel=1e-6)
    expected = torch.tensor(
        [
            [-0.009725934825837612, -0.002717464230954647, -0.007192952558398247, -0.004362043924629688],
            [-0.009349215775728226, -0.0021957086864858866, -0.006422342266887426, -0.0038535429630428553],
        ]
    )
    torch.testing.assert_close(outputs.logits[0, :2], expected, **TOLERANCE)


@pytest.mark.parametrize(
    ("head", "loss", "logits"),
    [
        (
            "resnet",
            1.1123981475830078,
            [
                [-0.018351389095187187, 0.013978215865790844, -0.03468358516693115],
                [-0.01319563202559948, 0.011277555488049984, -0.03375650942325592],
            ],
        ),
        (
            "attention_pooling",
            1.0624034404754639,
            [
                [-0.014182955026626587, -0.05620857700705528, 0.16447146236896515],
                [-0.010452691465616226, -0.046122584491968155, 0.16194403171539307],
            ],
        ),
    ],
)
def test_classifier_loss_and_logits(head, loss, logits):
    torch.manual_seed(0)
    config = tiny_config(classifier_head=head)
    model = SelfieForImageClassification(config).eval()
    with torch.no_grad():
        outputs = model(images(config), labels=torch.tensor([0, 2]))
    assert outputs.loss.item() == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(outputs.logits, torch.tensor(logits), **TOLERANCE)
