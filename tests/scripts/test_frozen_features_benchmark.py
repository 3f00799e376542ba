"""benchmarks/frozen_features_by_patch.py on a tiny checkpoint: its `image` read is run_evaluation.py's evaluation,
and its patch reads see each patch on its own, wherever it lies."""

import pytest
import torch

from benchmarks import frozen_features_by_patch
from modeling_selfie import SelfieForMaskedPatchPrediction
from selfie_training import feature_evaluation as run_evaluation
from selfie_training.evaluation import extract_features
from tests.utils import QUIET_FLAGS


@pytest.mark.parametrize("recalibration", [[], ["--recalibrate_batchnorm", "True"]], ids=["as saved", "recalibrated"])
def test_the_image_read_is_run_evaluations_and_the_patch_reads_one_vector_a_patch(pretrained, tmp_path, recalibration):
    flags = ["--model_name_or_path", str(pretrained), "--max_train_samples", "64", *QUIET_FLAGS, *recalibration]
    results = frozen_features_by_patch.main([*flags, "--output_dir", str(tmp_path / "by_patch")])
    evaluation = run_evaluation.main([*flags, "--output_dir", str(tmp_path / "evaluation")])

    assert list(results) == ["image", "patch_mean", "patch_grid"]
    for protocol in ("knn_top1", "linear_probe_top1"):
        assert results["image"][protocol] == evaluation[protocol]
    config = SelfieForMaskedPatchPrediction.config_class.from_pretrained(pretrained)
    channels = results["image"]["feature_size"]
    assert results["patch_mean"]["feature_size"] == channels
    assert results["patch_grid"]["feature_size"] == config.num_patches * channels
    assert (tmp_path / "by_patch" / "features_by_patch.json").is_file()


def _swap_first_and_last_patch(image: torch.Tensor, size: int) -> torch.Tensor:
    swapped = image.clone()
    swapped[:, :size, :size], swapped[:, -size:, -size:] = image[:, -size:, -size:], image[:, :size, :size]
    return swapped


def test_patch_reads_see_each_patch_alone_and_leave_the_model_as_it_was(pretrained):
    model = SelfieForMaskedPatchPrediction.from_pretrained(pretrained)
    size, (height, width) = model.config.patch_size, model.config.image_height_width
    images = torch.randn(4, 3, height, width)
    dataset = [{"pixel_values": image, "labels": 0} for image in images]
    swapped = [{"pixel_values": _swap_first_and_last_patch(image, size), "labels": 0} for image in images]
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}

    mean, mean_swapped = (
        frozen_features_by_patch.patch_features(model, d, "patch_mean").features for d in (dataset, swapped)
    )
    grid, grid_swapped = (
        frozen_features_by_patch.patch_features(model, d, "patch_grid").features for d in (dataset, swapped)
    )

    # The same patches in another place: the same vectors, moved with them in the grid, and the same mean.
    torch.testing.assert_close(mean_swapped, mean)
    grid, grid_swapped = grid.view(4, model.config.num_patches, -1), grid_swapped.view(4, model.config.num_patches, -1)
    torch.testing.assert_close(grid_swapped[:, [-1, *range(1, model.config.num_patches - 1), 0]], grid)
    torch.testing.assert_close(grid.mean(dim=1), mean)
    # A whole-image read sees the patches together, so moving them changes it.
    whole, whole_swapped = (extract_features(model, d).features for d in (dataset, swapped))
    assert not torch.allclose(whole, whole_swapped, atol=1e-4)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
