"""Selfie's objectives, each a small module of its own: for every hidden position, pick its own patch out of the
hidden patches of the same image (`PatchSelectionLoss`); and SplitMask's image-level InfoNCE between two
descriptors of every image (`ImageContrastiveLoss`)."""

import torch
import torch.nn.functional as F
from torch import nn


class PatchSelectionLoss(nn.Module):
    """Cross-entropy of choosing, for every hidden position i, its own patch among the image's hidden patches.

    Hidden patch j scores <v_i, h_j> / temperature against the query v_i of position i (the paper's v_i = u + pos_i,
    the summary of the visible patches plus the position's embedding, or what [`SelfieQueries`] makes of them). Every
    hidden position of the batch is scored in one batched matrix product.
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: `(batch, k, dim)`, v_i of the k hidden positions of each image.
            candidates: `(batch, k, dim)`, the vectors of the same k hidden patches, in the same order.

        Returns:
            The mean loss, and the `(batch, k, k)` logits: `logits[b, i, j]` scores patch j for position i, whose right
            answer is j = i.
        """
        logits = queries @ candidates.transpose(1, 2) / self.temperature
        targets = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[:2])
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


def candidate_hits(*logits: torch.Tensor) -> torch.Tensor:
    """Each image's share of hidden positions whose own patch scored highest, from one or more `(batch, k, k)` logits
    whose right answers are on the diagonal (one for each direction of the split objective, counted position by
    position): the candidate accuracy, before averaging over images."""
    hits = [scores.argmax(dim=-1) == torch.arange(scores.shape[-1], device=scores.device) for scores in logits]
    return torch.cat(hits, dim=1).float().mean(dim=-1)


class ImageContrastiveLoss(nn.Module):
    """InfoNCE between two descriptors of every image (SplitMask's image-level term, El-Nouby et al., 2021): each
    image's first descriptor must pick its own second descriptor out of those of every image of the global batch,
    and the other way round. Cosine similarities divided by `temperature`.

    Under several processes (`torch.distributed` initialised), the negatives of the whole global batch are gathered
    with their gradients, so that the mean of the processes' losses equals the loss of one process on the global
    batch (equal batches per process, as the Trainer's samplers give).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """`first` and `second`: `(batch, dim)` descriptors of this process's images, row i of each the same image."""
        first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
        all_first, all_second, offset = (
            gather_with_gradients(first),
            gather_with_gradients(second),
            _rank_offset(first),
        )
        targets = torch.arange(first.shape[0], device=first.device) + offset
        first_picks = F.cross_entropy(first @ all_second.T / self.temperature, targets)
        second_picks = F.cross_entropy(second @ all_first.T / self.temperature, targets)
        return (first_picks + second_picks) / 2


def gather_with_gradients(tensor: torch.Tensor) -> torch.Tensor:
    """The `tensor`s of every process, concatenated in rank order along dim 0, gradients flowing back to each
    process's own; the tensor itself where there is one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    from torch.distributed.nn.functional import all_gather  # differentiable, unlike torch.distributed.all_gather

    return torch.cat(all_gather(tensor), dim=0)


def _rank_offset(tensor: torch.Tensor) -> int:
    """Where this process's rows start in the gathered batch."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank() * tensor.shape[0]
