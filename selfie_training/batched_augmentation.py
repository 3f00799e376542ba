"""The training crops, flips and normalisation of `data.image_transform` on whole batches of images of one size, as
tensor operations on the device that holds them: each image's crop is drawn as torchvision draws it, then the
crops of the whole batch are resampled at once. `resident_images` makes its batches with them."""

import math

import torch


# torchvision's `RandomResizedCrop`: its aspect ratios, and its tries at a crop that fits before the centre crop.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


class RandomResizedCrops:
    """`data.GridAlignedResizedCrop` (with `grid=(1, 1)`, torchvision's `RandomResizedCrop`) and a horizontal flip at
    random, on a batch of images: each crop's height and width are resampled to `size` by torchvision's bilinear
    resize with antialiasing, written as one matrix a side (`resize_weights`), so that the whole batch is resampled
    by two batched matrix products, the flips folded into the second."""

    def __init__(self, size: tuple[int, int], scale: tuple[float, float], grid: tuple[int, int] = (1, 1)):
        self.size, self.scale, self.grid = size, scale, grid

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        count, _, height, width = images.shape
        top, left, crop_height, crop_width = resized_crop_params(
            count, (height, width), self.scale, self.grid, generator, images.device
        )
        flip = random_flips(count, generator, images.device)
        rows = resize_weights(top, crop_height, height, self.size[0])
        columns = resize_weights(left, crop_width, width, self.size[1])
        columns = torch.where(flip[:, None, None], columns.flip(1), columns)
        return rows[:, None] @ images.float() @ columns.transpose(1, 2)[:, None]


class PaddedRandomCrops:
    """torchvision's `RandomCrop(size, padding, padding_mode="reflect")` and a horizontal flip at random, on a batch
    of images: the crops are gathered from the images by reflected row and column indices."""

    def __init__(self, size: tuple[int, int], padding: int):
        self.size, self.padding = size, padding

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        count, channels, height, width = images.shape
        top = random_offsets(height + 2 * self.padding - self.size[0] + 1, count, generator, images.device)
        left = random_offsets(width + 2 * self.padding - self.size[1] + 1, count, generator, images.device)
        flip = random_flips(count, generator, images.device)
        rows = reflect(top[:, None] - self.padding + torch.arange(self.size[0], device=images.device), height)
        columns = reflect(left[:, None] - self.padding + torch.arange(self.size[1], device=images.device), width)
        columns = torch.where(flip[:, None], columns.flip(1), columns)
        images = images.gather(2, rows[:, None, :, None].expand(count, channels, -1, width))
        return images.gather(3, columns[:, None, None, :].expand(count, channels, self.size[0], -1)).float()

    def fits(self, image_size: tuple[int, int]) -> bool:
        """Whether images of `image_size` hold the crop once padded (torchvision refuses smaller ones)."""
        return all(side + 2 * self.padding >= crop for side, crop in zip(image_size, self.size, strict=True))


class Normalize:
    """`ToDtype(torch.float32, scale=True)` and `Normalize(mean, std)` of a batch of images of 0..255 values, in one
    multiply-add."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (mean, std))
        self.scale, self.offset = 1 / (255 * std), -mean / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.offset, images.float(), self.scale)


def resized_crop_params(
    count: int,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    grid: tuple[int, int] = (1, 1),
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, ...]:
    """`count` crops of images of `image_size` drawn as `GridAlignedResizedCrop.make_params` draws one: the tops,
    lefts, heights and widths. As torchvision: of ten tries of an area (a share of the image's, uniform in `scale`)
    and an aspect ratio (log-uniform in 3/4..4/3), the first that fits the image, placed uniformly; where none
    fits, the centre crop of the image's aspect ratio clamped to those ratios. Then each side moved to the nearest
    multiple of its cells of `grid` (at least one, at most as many as the image holds whole) and the crop back
    inside the image."""
    height, width = image_size
    shape = (count, CROP_TRIES)
    area = torch.empty(shape, device=device).uniform_(*scale, generator=generator) * (height * width)
    log_ratios = [math.log(ratio) for ratio in CROP_RATIO]
    aspect = torch.empty(shape, device=device).uniform_(*log_ratios, generator=generator).exp()
    heights, widths = (area / aspect).sqrt().round(), (area * aspect).sqrt().round()
    fits = (heights > 0) & (heights <= height) & (widths > 0) & (widths <= width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (argmax: the first maximum)
    found = fits.any(dim=1)
    centre_height, centre_width = _centre_crop(height, width)
    crop_height = torch.where(found, heights.gather(1, first)[:, 0], centre_height).long()
    crop_width = torch.where(found, widths.gather(1, first)[:, 0], centre_width).long()
    top = torch.where(
        found, random_offsets(height - crop_height + 1, count, generator, device), (height - crop_height) // 2
    )
    left = torch.where(
        found, random_offsets(width - crop_width + 1, count, generator, device), (width - crop_width) // 2
    )
    sides = []
    for start, side, cells, size in ((top, crop_height, grid[0], height), (left, crop_width, grid[1], width)):
        if size >= cells:  # (an image narrower than the grid keeps its crop)
            side = ((side / cells).round().long() * cells).clamp(cells, size - size % cells)
            start = torch.minimum(start, size - side)
        sides.append((start, side))
    (top, crop_height), (left, crop_width) = sides
    return top, left, crop_height, crop_width


def _centre_crop(height: int, width: int) -> tuple[int, int]:
    """torchvision's fallback crop: the whole image, its aspect ratio clamped to `CROP_RATIO`."""
    if width / height < min(CROP_RATIO):
        return round(width / min(CROP_RATIO)), width
    if width / height > max(CROP_RATIO):
        return height, round(height * max(CROP_RATIO))
    return height, width


def random_offsets(
    choices: torch.Tensor | int, count: int, generator: torch.Generator | None, device: torch.device | None
) -> torch.Tensor:
    """`count` integers, each uniform in 0..choices-1 (`torch.randint`'s distribution, for a bound per draw)."""
    drawn = (torch.rand(count, generator=generator, device=device) * choices).long()
    return drawn.clamp(max=choices - 1)  # float rounding can reach `choices`


def random_flips(count: int, generator: torch.Generator | None, device: torch.device | None) -> torch.Tensor:
    """Which of `count` images to flip: each with probability 1/2, as `RandomHorizontalFlip` draws it."""
    return torch.rand(count, generator=generator, device=device) < 0.5


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per image, the `(out_size, in_size)` matrix that resamples pixels `start .. start + length - 1` of a side of
    `in_size` pixels to `out_size` pixels as torch's bilinear interpolation with antialiasing does (torchvision's
    resize; without antialiasing where it enlarges): output pixel i is the normalised average of the input pixels
    around its centre `scale * (i + 0.5)`, weighted by a triangle of half-width max(scale, 1) input pixels,
    `scale = length / out_size`."""
    scale = length.float() / out_size
    support = scale.clamp(min=1)
    centre = scale[:, None] * (torch.arange(out_size, device=start.device) + 0.5)
    position = torch.arange(in_size, device=start.device) - start[:, None] + 0.5  # pixel centres, in crop coordinates
    weights = (1 - (position[:, None, :] - centre[:, :, None]).abs() / support[:, None, None]).clamp(min=0)
    weights = weights * ((position > 0) & (position < length[:, None]))[:, None, :]
    return weights / weights.sum(dim=2, keepdim=True)


def reflect(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel positions outside 0..size-1 mirrored back inside without repeating the edge, as "reflect" padding does."""
    return (size - 1) - ((size - 1) - positions.abs()).abs()
