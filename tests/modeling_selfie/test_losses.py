import math

import pytest
import torch

from modeling_selfie import PatchSelectionLoss, candidate_hits


def test_patch_selection_loss_against_a_hand_computed_value():
    # One image, two hidden positions; u = 0, so each query is the position's embedding.
    summary = torch.zeros(1, 2)
    positions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    candidates = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    loss, logits = PatchSelectionLoss(temperature=2.0)(summary, positions, candidates)
    # Scores <pos_i, h_j> / 2: row 0 is (1, 0), row 1 is (0, 2); the right answers are on the diagonal.
    assert logits.tolist() == [[[1.0, 0.0], [0.0, 2.0]]]
    expected = (-math.log(math.e / (math.e + 1)) - math.log(math.e**2 / (1 + math.e**2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_patch_selection_loss_matches_a_plain_loop_over_images_and_positions():
    generator = torch.Generator().manual_seed(0)
    summary, positions, candidates = (
        torch.randn(*shape, generator=generator) for shape in [(3, 8), (3, 4, 8), (3, 4, 8)]
    )
    loss, logits = PatchSelectionLoss(temperature=0.5)(summary, positions, candidates)
    losses = []
    for b in range(3):
        for i in range(4):
            scores = torch.stack([(summary[b] + positions[b, i]) @ candidates[b, j] / 0.5 for j in range(4)])
            assert torch.allclose(logits[b, i], scores, atol=1e-5)
            losses.append(-scores.log_softmax(0)[i])
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_candidate_hits_is_each_images_share_of_positions_won_by_their_own_patch():
    logits = torch.tensor(
        [
            [[3.0, 1.0], [0.0, 2.0]],  # both positions pick their own patch
            [[0.0, 5.0], [0.0, 2.0]],  # position 0 picks patch 1: one of two
        ]
    )
    assert candidate_hits(logits).tolist() == [1.0, 0.5]
