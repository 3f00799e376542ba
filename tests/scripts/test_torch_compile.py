"""--torch_compile in both training scripts, on the CPU: the whole step compiles without a graph break (a host-side
decision on a device value in it, such as a `.item()` or an `if` on a tensor, would break the graph, make the host
wait for the device, and keep CUDA graphs, `--torch_compile_mode reduce-overhead`, from capturing the step)."""

import math

import pytest
import torch

from tests.utils import TINY_MODEL_FLAGS, fine_tune, pretrain


# AOTAutograd traces the forward and backward graphs; the eager backend runs them without generating code, so that
# the test stays quick.
COMPILE_FLAGS = ["--torch_compile", "True", "--torch_compile_backend", "aot_eager"]
SMALL_RUN = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--max_train_samples", "16",
             "--max_eval_samples", "8"]  # fmt: skip


@pytest.mark.parametrize("script", ["pretraining", "fine-tuning"])
def test_torch_compile_trains_and_evaluates_without_a_graph_break(tmp_path, script):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    if script == "pretraining":
        metrics = pretrain(tmp_path, *SMALL_RUN, *COMPILE_FLAGS)
    else:
        metrics = fine_tune(tmp_path, *TINY_MODEL_FLAGS, *SMALL_RUN, *COMPILE_FLAGS)
    assert math.isfinite(metrics["eval_loss"])
    assert counters["stats"]["unique_graphs"] >= 1  # the model compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
