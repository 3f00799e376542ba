import math
import socket

import pytest
import torch

from modeling_selfie import PatchSelectionLoss, candidate_hits
from modeling_selfie.losses import ImageContrastiveLoss


def test_patch_selection_loss_against_a_hand_computed_value():
    # One image, two hidden positions.
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    candidates = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])
    loss, logits = PatchSelectionLoss(temperature=2.0)(queries, candidates)
    # Scores <v_i, h_j> / 2: row 0 is (1, 0), row 1 is (0, 2); the right answers are on the diagonal.
    assert logits.tolist() == [[[1.0, 0.0], [0.0, 2.0]]]
    expected = (-math.log(math.e / (math.e + 1)) - math.log(math.e**2 / (1 + math.e**2))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_patch_selection_loss_matches_a_plain_loop_over_images_and_positions():
    generator = torch.Generator().manual_seed(0)
    queries, candidates = (torch.randn(3, 4, 8, generator=generator) for _ in range(2))
    loss, logits = PatchSelectionLoss(temperature=0.5)(queries, candidates)
    losses = []
    for b in range(3):
        for i in range(4):
            scores = torch.stack([queries[b, i] @ candidates[b, j] / 0.5 for j in range(4)])
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
    # Both directions of the split objective, counted position by position (halves of 2 and 1 on an odd grid; one
    # candidate always wins): image 0 wins 2 + 1 of 3 positions, image 1 wins 1 + 1 of 3.
    one_candidate = torch.zeros(2, 1, 1)
    assert candidate_hits(logits, one_candidate).tolist() == pytest.approx([1.0, 2 / 3])
    reverse_lost = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 0 of 2, then 1 of 2
    assert candidate_hits(logits, reverse_lost).tolist() == [0.5, 0.5]


def test_image_contrastive_loss_against_a_hand_computed_value():
    # Two images, unit descriptors: image 0's two descriptors agree, image 1's are orthogonal.
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    second = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = ImageContrastiveLoss(temperature=0.5)(first, second)
    # first picks among second: row 0 scores (2, 2), row 1 (0, 0): each -log(1/2).
    # second picks among first: both rows score (2, 0); row 0's target is 0, row 1's is 1.
    first_picks = math.log(2)
    second_picks = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (math.e**2 + 1))) / 2
    assert loss.item() == pytest.approx((first_picks + second_picks) / 2, rel=1e-6)


def test_image_contrastive_loss_ignores_descriptor_norms():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    loss = ImageContrastiveLoss(temperature=0.1)
    assert loss(first, second).item() == pytest.approx(loss(3 * first, 0.5 * second).item(), rel=1e-5)


def _two_process_losses(rank: int, port: int, first: torch.Tensor, second: torch.Tensor, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = first.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        local_first = first[mine].clone().requires_grad_(True)
        loss = ImageContrastiveLoss(temperature=0.2)(local_first, second[mine])
        loss.backward()
        results[rank] = (loss.item(), local_first.grad.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_image_contrastive_loss_of_two_processes_equals_one_process_on_the_global_batch():
    """Negatives gathered across processes with gradients: the mean of the two processes' losses is the loss of one
    process on all 8 images, and the gradients that reach each process's descriptors are those of the global loss
    (summed over processes, as the gathered negatives send theirs home; DDP then averages, as for the loss)."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    global_first = first.clone().requires_grad_(True)
    global_loss = ImageContrastiveLoss(temperature=0.2)(global_first, second)
    global_loss.backward()

    with socket.socket() as probe:  # a free port for the two processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = torch.multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _two_process_losses, args=(port, first, second, results), nprocs=2, start_method="spawn"
        )
        (loss_0, grad_0), (loss_1, grad_1) = results[0], results[1]
    assert (loss_0 + loss_1) / 2 == pytest.approx(global_loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([grad_0, grad_1]) / 2, global_first.grad, rtol=1e-4, atol=1e-6)
