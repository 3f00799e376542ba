#!/usr/bin/env python
"""Launch the two-process pretraining and fine-tuning runs many times and count those that exit non-zero.

    python -m benchmarks.stress_multiprocess --runs 30 --output_file docs/results/stress-multiprocess.json

Each round is one `accelerate launch` of run_pretraining.py on two CPU processes joined by gloo (tiny model, the
embedded digits, 2 steps, evaluated after every step with the k-NN monitor, which the main process computes alone),
then one of run_image_classification.py from its checkpoint, also evaluated after every step. A run that finishes
its work but dies at interpreter exit (the failure this script was written to catch) counts as a failure, as a job
scheduler would count it. Not part of the test suite: 30 rounds take about 20 minutes on 2 cores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selfie_training.environment import package_versions
from selfie_training.runner import int_at_least


REPOSITORY = Path(__file__).resolve().parent.parent
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip
TINY = [
    "--backbone", "resnet18", "--backbone_kwargs", '{"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}',
    "--config_overrides", "hidden_size=32,num_attention_heads=4,num_hidden_layers=1",
    "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True", "--do_train", "--do_eval",
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
    "--max_train_samples", "64", "--max_eval_samples", "32", "--eval_strategy", "steps", "--eval_steps", "1",
]  # fmt: skip


def commands(output_dir: str) -> dict[str, list[str]]:
    pretraining = os.path.join(output_dir, "pretraining")
    return {
        "pretraining": [
            *LAUNCH, str(REPOSITORY / "run_pretraining.py"), *TINY, "--knn_monitor_samples", "16",
            "--output_dir", pretraining,
        ],
        "fine-tuning": [
            *LAUNCH, str(REPOSITORY / "run_image_classification.py"), *TINY,
            "--model_name_or_path", pretraining, "--output_dir", os.path.join(output_dir, "fine-tuning"),
        ],
    }  # fmt: skip


def run_round(index: int) -> list[dict]:
    """One pretraining launch and one fine-tuning launch, in a fresh folder; their exit statuses."""
    results = []
    with tempfile.TemporaryDirectory(prefix=f"stress-{index}-") as output_dir:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for name, command in commands(output_dir).items():
            start = time.perf_counter()
            process = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True)
            result = {"round": index, "run": name, "exit_status": process.returncode}
            result["seconds"] = round(time.perf_counter() - start, 1)
            if process.returncode != 0:
                result["stderr_tail"] = process.stderr[-2000:]
            results.append(result)
            print(f"round {index + 1}: {name} exit {process.returncode} ({result['seconds']} s)", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int_at_least(1), default=30, help="Rounds of (pretraining, fine-tuning) launches."
    )
    parser.add_argument("--output_file", default=None, help="Write every launch's exit status here as JSON.")
    args = parser.parse_args()
    results = []
    for index in range(args.runs):
        results += run_round(index)
        if args.output_file:  # after every round, so that an interrupted stress test keeps what it measured
            command = " ".join(["python -m benchmarks.stress_multiprocess", *sys.argv[1:]])
            record = {"command": command, "environment": package_versions(), "runs": args.runs}
            Path(args.output_file).write_text(json.dumps({**record, "launches": results}, indent=2) + "\n")
    for name in ("pretraining", "fine-tuning"):
        failed = sum(1 for result in results if result["run"] == name and result["exit_status"] != 0)
        print(f"{name}: {failed} of {args.runs} two-process launches exited non-zero")
    sys.exit(1 if any(result["exit_status"] != 0 for result in results) else 0)


if __name__ == "__main__":
    main()
