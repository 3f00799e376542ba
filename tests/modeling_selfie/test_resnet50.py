import pytest
import torch

from modeling_selfie import SelfieConfig, SelfieForImageClassification, SelfieForMaskedPatchPrediction


@pytest.mark.slow
def test_real_resnet50_configuration():
    config = SelfieConfig.from_preset("imagenet224", num_labels=1000)
    pretraining = SelfieForMaskedPatchPrediction(config).eval()
    assert pretraining.selfie.patch_network.num_features == 1024  # P ends in stage 3's 1024 channels
    projection = pretraining.selfie.patch_projection  # into A's width
    assert (projection.in_features, projection.out_features) == (1024, config.hidden_size)
    with torch.no_grad():
        patch_map = pretraining.selfie.feature_map(torch.randn(2, 3, 32, 32))
        assert patch_map.shape == (2, 1024, 2, 2)  # a 32x32 patch at stride 16
        output = pretraining(torch.randn(1, 3, 224, 224))
    assert output.logits.shape == (1, 12, 12)

    classifier = SelfieForImageClassification(config)
    resnet_parameters = sum(p.numel() for p in classifier.selfie.patch_network.parameters())
    resnet_parameters += sum(p.numel() for p in classifier.layer4.parameters())
    assert resnet_parameters == pytest.approx(23.5e6, rel=0.01)  # ResNet-50 without its classifier
    assert sum(p.numel() for p in classifier.layer4.parameters()) == pytest.approx(14.96e6, rel=0.01)
    assert classifier.classifier.in_features == 2048
