"""The sweep configs in configs/: every run's flags parse, and the GPU config runs end to end on the CPU with tiny
overrides (its bf16 and channels_last kept), so that it cannot rot where no GPU is at hand."""

import json
from pathlib import Path

import pytest
import torch

from selfie_training import sweep as run_sweep
from tests.utils import REPOSITORY, TINY_MODEL


CONFIGS = sorted((REPOSITORY / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_every_config_parses_with_the_scripts_flags(path):
    sweep = run_sweep.Sweep.from_json(str(path))
    if not torch.cuda.is_available():  # TrainingArguments refuses --bf16 on a machine without a GPU unless told
        sweep.data["use_cpu"] = True
    run_sweep.check_flags(sweep, str(path))


def test_the_gpu_config_runs_on_the_cpu_with_tiny_overrides(tmp_path, parquet_folder):
    sweep = json.loads((REPOSITORY / "configs" / "cifar10_gpu.json").read_text())
    tiny_run = {"max_steps": 2, "per_device_train_batch_size": 8, "warmup_steps": 0, "use_cpu": True}
    sweep["output_dir"] = str(tmp_path / "out")
    sweep["label_fractions"], sweep["seeds"] = [0.5], [0]
    sweep["data"].update(
        dataset_name=str(parquet_folder), dataloader_num_workers=1, per_device_eval_batch_size=16, report_to="none",
        **TINY_MODEL,
    )  # fmt: skip
    for section in ("pretraining", "finetuning"):
        sweep[section].update(tiny_run)
    assert sweep["data"]["bf16"] and sweep["data"]["channels_last"]  # the GPU paths, run here on the CPU
    assert sweep["data"]["dataloader_persistent_workers"]  # its workers kept across epochs, here one
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    rows = run_sweep.main([str(path)])
    assert [row["label_fraction"] for row in rows] == [0.5]
    for method in ("scratch", "selfie"):
        assert 0 <= rows[0][method]["mean"] <= 100
    pretrained = Path(sweep["output_dir"]) / "pretraining"
    assert json.loads((pretrained / "config.json").read_text())["stem"] == "cifar"
    assert json.loads((pretrained / "trainer_state.json").read_text())["global_step"] == 2
