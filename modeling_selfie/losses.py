"""Selfie's objective, a small module of its own: for every hidden position, pick its own patch out of the hidden
patches of the same image."""

import torch
import torch.nn.functional as F
from torch import nn


class PatchSelectionLoss(nn.Module):
    """Cross-entropy of choosing, for every hidden position i, its own patch among the image's hidden patches.

    The query of position i is u + pos_i (the summary of the visible patches plus the position's embedding); hidden
    patch j scores <u + pos_i, h_j> / temperature. Every hidden position of the batch is scored in one batched matrix
    product.
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, summary: torch.Tensor, position_embeddings: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            summary: `(batch, dim)`, u.
            position_embeddings: `(batch, k, dim)`, pos_i of the k hidden positions of each image.
            candidates: `(batch, k, dim)`, the vectors of the same k hidden patches, in the same order.

        Returns:
            The mean loss, and the `(batch, k, k)` logits: `logits[b, i, j]` scores patch j for position i, whose right
            answer is j = i.
        """
        queries = summary.unsqueeze(1) + position_embeddings
        logits = queries @ candidates.transpose(1, 2) / self.temperature
        targets = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[:2])
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


def candidate_hits(logits: torch.Tensor) -> torch.Tensor:
    """Each image's share of hidden positions whose own patch scored highest, from `(batch, k, k)` logits whose right
    answers are on the diagonal: the candidate accuracy, before averaging over images."""
    targets = torch.arange(logits.shape[-1], device=logits.device)
    return (logits.argmax(dim=-1) == targets).float().mean(dim=-1)
