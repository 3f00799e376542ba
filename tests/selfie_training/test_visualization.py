"""The figure of the pretext task: the picks it draws are the model's own, and a pretraining run puts it into its
card."""

import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image

from modeling_selfie import SelfieForMaskedPatchPrediction, preset_image_processor
from selfie_training import pretext_visualization
from selfie_training.errors import UserError
from selfie_training.visualization import (
    FIGURE_IMAGES,
    FIGURE_NAME,
    RIGHT,
    WRONG,
    do_pretext_task,
    draw_pretext_tasks,
    to_image,
)
from tests.utils import QUIET_FLAGS, fixed_mask, images, perturbed, tiny_config


@pytest.mark.parametrize("masking_strategy", ["random", "split"])
def test_the_picks_drawn_are_the_models_argmax_and_their_probabilities_its_softmax(masking_strategy):
    config = tiny_config(masking_strategy=masking_strategy)
    model = perturbed(SelfieForMaskedPatchPrediction(config)).eval()
    pixel_values, mask = images(config, batch_size=3), fixed_mask(config, batch_size=3)
    with torch.no_grad():
        outputs = model(pixel_values, bool_masked_pos=mask)
    logits = [outputs.logits] + ([outputs.reverse_logits] if masking_strategy == "split" else [])

    model.train()  # drawn in eval mode, and the mode restored after
    tasks = do_pretext_task(model, pixel_values, mask)
    assert model.training

    figure = draw_pretext_tasks(tasks, config, preset_image_processor("cifar10"))
    picks_axes = [axis for axis in figure.axes if axis.get_label() == "picks"]
    assert len(picks_axes) == 3 * len(logits)
    hidden = [row.nonzero().flatten() for row in mask]
    visible = [(~row).nonzero().flatten() for row in mask]
    for index, task in enumerate(tasks):
        assert torch.equal(task.bool_masked_pos, mask[index])
        image = to_image(task.pixel_values, preset_image_processor("cifar10"))
        for direction, (fill_in, scores) in enumerate(zip(task.fill_ins, logits, strict=True)):
            picks = scores[index].argmax(dim=-1)
            assert torch.equal(fill_in.picks, picks)
            torch.testing.assert_close(fill_in.probabilities, scores[index].softmax(dim=-1))
            assert torch.equal(fill_in.positions, (hidden, visible)[direction][index])
            # Each position filled in shows the pixels of the patch at the position of the candidate picked, outlined
            # in the colour of a right or a wrong pick, with its probability.
            axis = picks_axes[index * len(logits) + direction]
            drawn = axis.images[0].get_array()
            for position, pick in zip(fill_in.positions.tolist(), picks.tolist(), strict=True):
                source = fill_in.positions[pick].item()
                assert (drawn[patch(position, config)] == image[patch(source, config)]).all()
            right = (picks == torch.arange(len(picks))).tolist()
            assert [to_hex(rectangle.get_edgecolor()) for rectangle in axis.patches] == [
                RIGHT if hit else WRONG for hit in right
            ]
            probabilities = scores[index].softmax(dim=-1).max(dim=-1).values.tolist()
            assert [text.get_text() for text in axis.texts] == [
                f"{'✓' if hit else '✗'}{probability:.2f}"
                for hit, probability in zip(right, probabilities, strict=True)
            ]
    assert any(not fill_in.right.all() for task in tasks for fill_in in task.fill_ins)  # some wrong picks to draw


def patch(position: int, config) -> tuple[slice, slice]:
    row, column = divmod(position, config.grid_size[1])
    size = config.patch_size
    return slice(row * size, (row + 1) * size), slice(column * size, (column + 1) * size)


def test_pretraining_writes_the_figure_and_its_card_shows_it(pretrained):
    with Image.open(pretrained / FIGURE_NAME) as figure:
        width, height = figure.size
    assert figure.format == "PNG" and width < 1000 and height < 1000  # small: the card shows it as it is
    card = (pretrained / "README.md").read_text()
    section = card[card.index("<!-- pretext_task -->") : card.index("<!-- /pretext_task -->")]
    assert f"![The pretext task on {FIGURE_IMAGES} images]({FIGURE_NAME})" in section  # relative to the card
    assert f"{FIGURE_IMAGES} images held out from the training split of sklearn-digits (not trained on)" in section


def test_run_visualization_draws_one_figure_an_image(tmp_path, pretrained):
    flags = ["--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path), *QUIET_FLAGS]
    paths = pretext_visualization.main([*flags, "--num_images", "2", "--max_eval_samples", "16"])

    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["pretext_task_0.png", "pretext_task_1.png"]
    assert [str(tmp_path / name) for name in ("pretext_task_0.png", "pretext_task_1.png")] == paths
    with pytest.raises(UserError, match="--num_images 0 must be at least 1"):
        pretext_visualization.main([*flags, "--num_images", "0"])
