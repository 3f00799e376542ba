"""The throughput benchmark, run tiny on the CPU: what it measures must add up, whatever the speed."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import benchmark_throughput
from tests.utils import TINY_MODEL, TINY_MODEL_FLAGS


def test_benchmark_measures_every_step_on_both_grids(parquet_folder, tmp_path, capsys):
    output_file = tmp_path / "throughput.json"
    rows = benchmark_throughput.main(
        [*TINY_MODEL_FLAGS, "--dataset_name", str(parquet_folder), "--batch_size", "4", "--steps", "2",
         "--warmup_steps", "1", "--repeats", "1", "--output_file", str(output_file)]
    )  # fmt: skip
    measurements = [*benchmark_throughput.MODEL_STEPS, *benchmark_throughput.DATA_STEPS]
    assert [(row["grid"], row["measurement"]) for row in rows] == [
        (grid, measurement) for grid in ("cifar10", "imagenet224") for measurement in measurements
    ]
    report = json.loads(output_file.read_text())
    assert report["results"] == rows and report["precision"] == "float32"
    for row in rows:
        assert row["batch_size"] == 4
        assert math.isfinite(row["images_per_second"]) and row["images_per_second"] > 0
        assert row["peak_memory_gib"] >= 0
    for grid in ("cifar10", "imagenet224"):
        step = {row["measurement"]: row for row in rows if row["grid"] == grid}
        assert step["peer"]["ratio_to_peer"] == 1.0
        assert step["selfie"]["ratio_to_peer"] == pytest.approx(
            step["selfie"]["images_per_second"] / step["peer"]["images_per_second"]
        )
        # The classifier a Selfie checkpoint starts is the peer's network: P, stage 4, a linear layer.
        assert step["finetune"]["flops_per_image"] == step["peer"]["flops_per_image"]
        # Selfie runs P on the patches (no stage 4) plus the small attention pooling network.
        assert 0 < step["selfie"]["flops_per_image"] < step["peer"]["flops_per_image"]
        assert step["script"]["flops_per_image"] == step["selfie"]["flops_per_image"]
        # The split objective runs A once a half (over all patches, not the visible three quarters) and scores both
        # halves; the contrastive term adds its projection head: each costs a little more, P's share the same.
        flops = [step[objective]["flops_per_image"] for objective in benchmark_throughput.OBJECTIVES]
        assert flops == sorted(set(flops)) and flops[-1] < 1.2 * flops[0]
        for script, bare in benchmark_throughput.SCRIPT_STEPS.items():
            assert step[script]["flops_per_image"] == step[bare]["flops_per_image"]
            assert step[script]["ratio_to_step"] == pytest.approx(
                step[script]["images_per_second"] / step[bare]["images_per_second"]
            )
            assert step[script]["ratio_to_step_runs"] == pytest.approx([step[script]["ratio_to_step"]])  # one round
            # In the script's own process, the share of its steps spent in the model's step, and the rest.
            ratio, outside = (
                step[script]["in_process_ratio_to_step"],
                step[script]["in_process_ms_per_step_outside_model"],
            )
            assert 0 < ratio < 1 and outside > 0
            assert outside == pytest.approx(1000 * (1 - ratio) * 4 / step[script]["images_per_second"])
            # The time of a step of the script that its bare step does not take, in milliseconds.
            outside = 4 / step[script]["images_per_second"] - 4 / step[bare]["images_per_second"]
            assert step[script]["ms_per_step_outside_model"] == pytest.approx(1000 * outside)
        for row in step.values():
            if "flops_per_image" in row:
                assert row["tflops_per_second"] == pytest.approx(
                    row["flops_per_image"] * row["images_per_second"] / 1e12
                )
    table = capsys.readouterr().out
    assert "| grid" in table and "x peer" in table and table.count("imagenet224") == len(measurements)


def test_a_measurement_reports_its_median_run_and_every_runs_rate():
    runs = [
        {"images_per_second": 30.0, "flops_per_image": 1.0, "peak_memory_gib": 0.5},
        {"images_per_second": 10.0, "flops_per_image": 1.0, "peak_memory_gib": 0.75},
        {"images_per_second": 20.0, "flops_per_image": 1.0, "peak_memory_gib": 0.25},
    ]
    assert benchmark_throughput.median(runs) == {
        "images_per_second": 20.0,
        "flops_per_image": 1.0,
        "images_per_second_runs": [30.0, 10.0, 20.0],
        "peak_memory_gib": 0.75,
    }


def test_no_in_process_split_of_a_script_whose_workers_share_the_cores(parquet_folder, tmp_path):
    (row,) = benchmark_throughput.main(
        [*TINY_MODEL_FLAGS, "--dataset_name", str(parquet_folder), "--grids", "cifar10", "--measurements",
         "finetune_script", "--resident_images", "False", "--dataloader_num_workers", "1", "--batch_size", "4",
         "--steps", "1", "--warmup_steps", "0", "--repeats", "1", "--output_file", str(tmp_path / "out.json")]
    )  # fmt: skip
    assert row["images_per_second"] > 0 and "in_process_ratio_to_step" not in row


def test_a_scripts_in_process_figures_are_the_median_of_its_runs():
    runs = [
        {"images_per_second": rate, "peak_memory_gib": 0.5, "in_process_ratio_to_step": ratio,
         "in_process_ms_per_step_outside_model": outside}
        for rate, ratio, outside in ((30.0, 0.99, 1.0), (10.0, 0.9, 9.0), (20.0, 0.95, 4.0))
    ]  # fmt: skip
    summary = benchmark_throughput.median(runs)
    assert summary["images_per_second"] == 20.0
    assert summary["in_process_ratio_to_step"] == 0.95 and summary["in_process_ratio_to_step_runs"] == [
        0.99,
        0.9,
        0.95,
    ]
    assert summary["in_process_ms_per_step_outside_model"] == 4.0


def test_a_scripts_ratio_to_its_step_is_taken_round_by_round_too():
    rows = [
        {"grid": "cifar10", "measurement": "finetune", "batch_size": 4, "images_per_second": 20.0,
         "images_per_second_runs": [20.0, 10.0, 40.0], "flops_per_image": 1.0},
        {"grid": "cifar10", "measurement": "finetune_script", "batch_size": 4, "images_per_second": 19.0,
         "images_per_second_runs": [19.0, 11.0, 30.0]},
    ]  # fmt: skip
    benchmark_throughput._add_ratios(rows)
    assert rows[1]["ratio_to_step"] == pytest.approx(19 / 20)  # the medians'
    assert rows[1]["ratio_to_step_runs"] == pytest.approx([19 / 20, 11 / 10, 30 / 40])


def test_benchmark_counts_the_flops_of_a_whole_training_step(tmp_path):
    """Forward and backward: about three times the forward pass (the backward pass computes gradients of both the
    weights and the inputs, except the inputs of the first convolution)."""
    rows = benchmark_throughput.main(
        [*TINY_MODEL_FLAGS, "--grids", "cifar10", "--measurements", "peer", "--batch_size", "2", "--steps", "1",
         "--warmup_steps", "0", "--repeats", "1", "--output_file", str(tmp_path / "throughput.json")]
    )  # fmt: skip
    settings = benchmark_throughput._settings(benchmark_throughput.BenchmarkArguments(**TINY_MODEL), "cifar10", "cpu")
    resnet = benchmark_throughput.create_resnet(settings.model_config())
    resnet.reset_classifier(10)
    with FlopCounterMode(display=False) as counter:
        resnet(torch.randn(1, 3, 32, 32))
    forward = counter.get_total_flops()
    assert 2.5 * forward < rows[0]["flops_per_image"] < 3 * forward


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grids", "cifar100"], "--grids cifar100: choose among cifar10, imagenet224."),
        (["--repeats", "0"], "--repeats 0 must be at least 1."),
        (["--batch_size", "0"], "--batch_size 0 must be at least 1."),
        (["--warmup_steps", "-1"], "--warmup_steps -1 must be at least 0."),
        (["--measurements", "loader", "--dataset_name", "/no/such/folder"], "--dataset_name /no/such/folder"),
    ],
)
def test_benchmark_refuses_bad_flags_in_one_line(flags, message, tmp_path):
    defaults = ["--batch_size", "2", "--steps", "1", "--repeats", "1", "--output_file", str(tmp_path / "out.json")]
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")) as error:
        benchmark_throughput.main([*defaults, *flags])  # the flags under test come last, and win
    assert "\n" not in str(error.value)
