"""Pictures of Selfie's pretext task as a pretraining model does it: for each image, the hidden positions, the
candidate patches, and the patch the model picks for every position, with its probability.

The picks are the model's own: the argmax of the `logits` (and, under the split objective, `reverse_logits`) of
`SelfieForMaskedPatchPrediction` on the masks drawn here; nothing is scored again. Drawn with matplotlib's Agg
canvas, into files only.
"""

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from modeling_selfie import random_patch_mask
from modeling_selfie.modeling_selfie import split_positions

from .data import collate_images


logger = logging.getLogger(__name__)

FIGURE_NAME = "pretext_task.png"  # what a pretraining run writes into --output_dir, and its card shows
FIGURE_IMAGES = 4  # the images of that figure
DPI = 100

RIGHT, WRONG = "#1a9850", "#d73027"  # a pick of the position's own patch, and of another
HIDDEN = "#ffd92f"  # the outline of the hidden positions
# The titles of the figure's columns, for a task in one direction and in two (the split objective).
COLUMN_TITLES = {
    1: (
        "image,\nhidden patches outlined",
        "candidates:\nthe hidden patches",
        "the model's pick\nfor each hidden position",
    ),
    2: (
        "image,\nhidden half outlined",
        "candidates:\nthe hidden half",
        "picks for the hidden half,\nfrom the visible one",
        "candidates:\nthe visible half",
        "picks for the visible half,\nfrom the hidden one",
    ),
}
LEGEND = "✓ green: the right patch   ✗ red: a wrong one   number: the model's probability for its pick"
OUTLINE = [patheffects.withStroke(linewidth=3, foreground="black")]  # keeps lines and text readable on any image


@dataclass
class FillIn:
    """One summary filling in some positions of one image: the task in one direction. The candidates are the
    patches of the positions filled in, in the same order, so that the right pick of position i is candidate i."""

    positions: torch.Tensor  # (k,) the grid positions filled in, in grid order
    probabilities: torch.Tensor  # (k, k) the softmax of the model's logits: row i, the candidates for position i
    picks: torch.Tensor  # (k,) the argmax of the model's logits: the candidate it picks for each position

    @property
    def right(self) -> torch.Tensor:
        return self.picks == torch.arange(len(self.picks))

    @property
    def pick_probabilities(self) -> torch.Tensor:
        return self.probabilities.gather(1, self.picks[:, None]).squeeze(1)


@dataclass
class PretextTask:
    """The pretext task on one image, as the model did it."""

    pixel_values: torch.Tensor  # (channels, height, width), normalised as the model reads them
    bool_masked_pos: torch.Tensor  # (num_patches,), True where a patch was hidden
    # The visible patches' summary filling in the hidden positions; under the split objective, then the hidden
    # half's summary filling in the visible positions.
    fill_ins: list[FillIn]


@torch.no_grad()
def do_pretext_task(model, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> list[PretextTask]:
    """The pretext task on every image of `pixel_values`, hiding the patches of `bool_masked_pos`, done by `model`
    (a `SelfieForMaskedPatchPrediction`) in eval mode; its mode is restored after. Every process of a multi-process
    run must call it together: the image-level contrastive term of the forward gathers across processes."""
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        outputs = model(
            pixel_values.to(parameter.device, parameter.dtype), bool_masked_pos=bool_masked_pos.to(parameter.device)
        )
    finally:
        model.train(was_training)
    visible, hidden = split_positions(bool_masked_pos, model.config.num_masked_patches)
    directions = [(outputs.logits, hidden)]
    if outputs.reverse_logits is not None:
        directions.append((outputs.reverse_logits, visible))
    return [
        PretextTask(
            pixel_values[index].cpu(),
            bool_masked_pos[index].cpu(),
            [_fill_in(logits[index], positions[index]) for logits, positions in directions],
        )
        for index in range(len(pixel_values))
    ]


def _fill_in(logits: torch.Tensor, positions: torch.Tensor) -> FillIn:
    logits = logits.float().cpu()
    return FillIn(positions.cpu(), logits.softmax(dim=-1), logits.argmax(dim=-1))


def read_images(dataset, count: int) -> torch.Tensor:
    """The pixel values of the first `count` images of `dataset` (from `with_image_transform`), those that can be
    read."""
    return collate_images(list(itertools.islice(dataset, count)))["pixel_values"]


def draw_masks(config, count: int, seed: int) -> torch.Tensor:
    """`count` masks of the model's objective (`num_masked_patches` hidden at random), drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return random_patch_mask(count, config.num_patches, config.num_masked_patches, generator=generator)


def draw_pretext_tasks(tasks: list[PretextTask], config, image_processor) -> Figure:
    """One row a task: the image, its hidden positions outlined; then, for each direction of the task, the
    candidate patches and the picks. A pick is drawn in its position, outlined and marked in green (the position's own
    patch) or red (another), with the model's probability for it; the patches it was picked from are dimmed."""
    directions = len(tasks[0].fill_ins)
    figure, axes = _panels(len(tasks), 1 + 2 * directions, panel=max(1.6, 0.4 * max(config.grid_size)))
    for task, row in zip(tasks, axes, strict=True):
        image = to_image(task.pixel_values, image_processor)
        _draw_image(row[0], image, task, config)
        for index, fill_in in enumerate(task.fill_ins):
            _draw_candidates(row[1 + 2 * index], image, fill_in, config)
            _draw_picks(row[2 + 2 * index], image, fill_in, config)
    for axis, title in zip(axes[0], COLUMN_TITLES[directions], strict=True):
        axis.set_title(title, fontsize=8)
    figure.text(0.5, 0.1 / figure.get_figheight(), LEGEND, ha="center", va="bottom", fontsize=8)
    return figure


# The figure's layout, in inches: room for two lines of titles above the first row, for a line of text below every
# row, and for the legend at the bottom.
TITLES, ROW_LABEL, FOOTER, MARGIN, GAP = 0.45, 0.25, 0.35, 0.1, 0.2


def _panels(rows: int, columns: int, panel: float) -> tuple[Figure, list]:
    """A figure of `rows` x `columns` square panels `panel` inches wide, without ticks, on the Agg canvas. Laid out
    here rather than by `tight_layout`, which draws the whole figure once more to measure it."""
    width = 2 * MARGIN + columns * panel + (columns - 1) * GAP
    height = TITLES + rows * (panel + ROW_LABEL) + FOOTER
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = []
    for row in range(rows):
        bottom = height - TITLES - (row + 1) * panel - row * ROW_LABEL
        axes.append(
            [
                figure.add_axes(
                    (
                        (MARGIN + column * (panel + GAP)) / width,
                        bottom / height,
                        panel / width,
                        panel / height,
                    ),
                    xticks=[],
                    yticks=[],
                )
                for column in range(columns)
            ]
        )
    return figure, axes


def to_image(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """Normalised `(channels, height, width)` pixel values as a `(height, width, channels)` image in [0, 1]."""
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return (pixel_values.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _cell(position: int, config) -> tuple[slice, slice]:
    """The rows and columns of pixels of the patch at grid `position`."""
    row, column = divmod(int(position), config.grid_size[1])
    size = config.patch_size
    return slice(row * size, (row + 1) * size), slice(column * size, (column + 1) * size)


def _corner(position: int, config) -> tuple[float, float]:
    """The top left corner of the patch at grid `position`, in imshow's coordinates (pixel centres at integers)."""
    rows, columns = _cell(position, config)
    return columns.start - 0.5, rows.start - 0.5


def _draw_image(axis, image: np.ndarray, task: PretextTask, config):
    axis.imshow(image)
    for position in task.bool_masked_pos.nonzero().flatten():
        _outline(axis, _corner(position, config), config.patch_size, HIDDEN)


def picks_image(image: np.ndarray, fill_in: FillIn, config) -> np.ndarray:
    """The image with the patch that the model picks drawn in every position filled in, the others dimmed."""
    picked = image * 0.35 + 0.65 * 0.5  # towards grey: the context recedes, dark or bright
    for position, pick in zip(fill_in.positions, fill_in.picks, strict=True):
        picked[_cell(position, config)] = image[_cell(fill_in.positions[pick], config)]
    return picked


def _draw_picks(axis, image: np.ndarray, fill_in: FillIn, config):
    axis.imshow(picks_image(image, fill_in, config))
    size = config.patch_size
    for position, right, probability in zip(fill_in.positions, fill_in.right, fill_in.pick_probabilities, strict=True):
        left, top = _corner(position, config)
        colour = RIGHT if right else WRONG
        _outline(axis, (left, top), size, colour, linestyle="-" if right else "--")
        axis.text(
            left + size / 2,
            top + size - 0.5,
            f"{'✓' if right else '✗'}{probability:.2f}",
            ha="center",
            va="bottom",
            fontsize=6.5,
            color="white",
            bbox={"boxstyle": "square,pad=0.1", "facecolor": colour, "edgecolor": "none", "alpha": 0.85},
        )
    axis.set_xlabel(f"{int(fill_in.right.sum())} of {len(fill_in.right)} right", fontsize=8)
    axis.set_label("picks")  # found by the tests


def _draw_candidates(axis, image: np.ndarray, fill_in: FillIn, config):
    """The candidate patches in grid order, in as square an arrangement as their number allows, a gap between."""
    count, size = len(fill_in.positions), config.patch_size
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = max(1, size // 8)
    sheet = np.ones((rows * (size + gap) - gap, columns * (size + gap) - gap, image.shape[2]))
    for index, position in enumerate(fill_in.positions):
        row, column = divmod(index, columns)
        top, left = row * (size + gap), column * (size + gap)
        sheet[top : top + size, left : left + size] = image[_cell(position, config)]
    axis.imshow(sheet)
    axis.set_frame_on(False)


def _outline(axis, corner: tuple[float, float], size: int, colour: str, linestyle: str = "-"):
    """Outline the patch of `size` pixels at `corner`, inside its edges: neighbours outlined too stay apart."""
    inset = 0.1 * size
    left, top = corner
    rectangle = Rectangle(
        (left + inset, top + inset),
        size - 2 * inset,
        size - 2 * inset,
        fill=False,
        edgecolor=colour,
        linewidth=1.5,
        linestyle=linestyle,
    )
    rectangle.set_path_effects(OUTLINE)
    axis.add_patch(rectangle)


def write_pretext_figure(tasks: list[PretextTask], config, image_processor, path: str):
    """Draw `tasks` (`draw_pretext_tasks`) into the PNG file `path`."""
    figure = draw_pretext_tasks(tasks, config, image_processor)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=DPI)


class PretextFigure:
    """The figure of the pretext task that a pretraining run draws when training ends (`FIGURE_NAME` in its output
    directory), and the model card's section on it.

    `dataset` holds a few images (from `with_image_transform`, evaluation transform) that `source` describes, e.g.
    "images of the validation split of X"; `seed` draws their masks."""

    def __init__(self, dataset, image_processor, seed: int, source: str):
        self.dataset, self.image_processor, self.seed, self.source = dataset, image_processor, seed, source
        self.images = None  # how many images the figure shows, once `write` ran (0: none could be read)

    def write(self, model, output_dir: str, main_process: bool):
        """Do the task on the images with `model`, on every process (see `do_pretext_task`); draw it on the main one."""
        start = time.perf_counter()
        pixel_values = read_images(self.dataset, FIGURE_IMAGES)
        self.images = len(pixel_values)
        if self.images == 0:
            logger.warning("None of the %s could be read: no figure of the pretext task.", self.source)
            return
        tasks = do_pretext_task(model, pixel_values, draw_masks(model.config, self.images, self.seed))
        if main_process:
            path = os.path.join(output_dir, FIGURE_NAME)
            write_pretext_figure(tasks, model.config, self.image_processor, path)
            seconds = time.perf_counter() - start
            logger.info("Drew the pretext task on %d %s into %s in %.1fs.", self.images, self.source, path, seconds)

    def card_section(self, split_objective: bool) -> str:
        """The model card's section on the figure, its link relative to the card."""
        other_direction = (
            " The split objective's other direction follows: the hidden half's summary picks, for each visible "
            "position, one of the visible patches."
            if split_objective
            else ""
        )
        return (
            f"![The pretext task on {self.images} images]({FIGURE_NAME})\n\n"
            f"{self.images} {self.source}, one a row, each with its own random mask (images and masks drawn with seed "
            f"{self.seed}). Left, the image with its hidden patches outlined; then the candidates, its hidden patches; "
            "then, in each hidden position, the patch that the model picks for it from the summary of the visible "
            "patches, and the model's probability for that pick: green ✓ where it is the right patch, red ✗ where it "
            f"is another.{other_direction} Drawn by run_pretraining.py at the end of training; run_visualization.py "
            "draws more images, one figure each."
        )
