"""run_sweep.py refuses a bad sweep file in one line before its first run."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selfie_training import sweep as run_sweep
from selfie_training.runner import ModelArguments, build_config
from tests.utils import REPOSITORY, TINY_MODEL


BAD_SWEEPS = [
    (
        '{"output_dir": "OUT", "label_fractions": [1.5]}',
        r"label_fractions \[1\.5\] must be a list of numbers in \(0, 1\]",
    ),
    ('{"output_dir": "OUT", "label_fractions": [0.05, 0]}', r"label_fractions \[0\.05, 0\] must be a list of numbers"),
    ('{"output_dir": "OUT", "label_fractions": ["0.05"]}', r"label_fractions \['0\.05'\] must be a list of numbers"),
    ('{"output_dir": "OUT", "label_fractions": 0.05}', r"label_fractions 0\.05 must be a list of numbers"),
    ('{"output_dir": "OUT", "seeds": [0, 1.5]}', r"seeds \[0, 1\.5\] must be a list of integers"),
    ('{"output_dir": "OUT", "seeds": [0, 1, 0]}', r"seeds \[0, 1, 0\] repeat 0: one run each"),
    ('{"output_dir": "OUT", "label_fractions": [0.05, 0.050]}', r"label_fractions \[0\.05, 0\.05\] repeat 0\.05"),
    ('{"output_dir": "OUT", "label_fraction": [0.1]}', r"unknown sweep settings \['label_fraction'\]"),
    ('{"label_fractions": [0.1]}', r"no output_dir"),
    ('[{"output_dir": "OUT"}]', r"holds a JSON list, not an object of sweep settings"),
    ('{"output_dir": "OUT",', r"not valid JSON"),
    ('{"output_dir": "OUT", "finetuning": ["--seed", "1"]}', r"finetuning must be an object of flags"),
    ('{"output_dir": "OUT", "base": ["a.json"]}', r"base \['a\.json'\] must be the path of a sweep file"),
    ('{"output_dir": "OUT", "base": "sweep.json"}', r"base sweep\.json leads back to .*sweep\.json"),
    # (argparse takes an unambiguous prefix of a flag as the flag: "num_train_epoch" would be num_train_epochs.)
    (
        '{"output_dir": "OUT", "selfie": {"pretrained_lr": 0.1}}',
        r"the selfie runs' flags are refused: .*--pretrained_lr",
    ),
    (
        '{"output_dir": "OUT", "pretraining": {"num_epochs": 1}}',
        r"the pretraining runs' flags are refused: .*--num_epochs",
    ),
    (
        '{"output_dir": "OUT", "data": {"dataloader_persistent_workers": true, "dataloader_num_workers": 0}}',
        r"the pretraining runs' flags are refused: --dataloader_persistent_workers keeps the DataLoader's workers",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_SWEEPS)
def test_a_bad_sweep_is_refused_before_any_run(tmp_path, content, message):
    path = tmp_path / "sweep.json"
    path.write_text(content.replace("OUT", str(tmp_path / "out")))
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        run_sweep.main([str(path)])
    assert not (tmp_path / "out").exists()


def test_a_missing_sweep_file_is_one_line_with_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "run_sweep.py"), str(tmp_path / "none.json")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"run_sweep.py: error: {tmp_path / 'none.json'}: cannot be read (No such file or directory)."
    )


def test_each_method_gets_its_own_flags(tmp_path):
    sweep = run_sweep.Sweep(
        output_dir=str(tmp_path), finetuning={"learning_rate": 0.001}, selfie={"pretrained_learning_rate": 0.0002},
        scratch={"learning_rate": 0.003},
    )  # fmt: skip
    selfie = run_sweep.fine_tuning_flags(sweep, "PRE", "selfie", 0.05, 1)
    scratch = run_sweep.fine_tuning_flags(sweep, "PRE", "scratch", 0.05, 1)
    assert selfie[selfie.index("--learning_rate") + 1] == "0.001"
    assert selfie[selfie.index("--pretrained_learning_rate") + 1] == "0.0002"
    assert selfie[selfie.index("--model_name_or_path") + 1] == "PRE"
    assert scratch[scratch.index("--learning_rate") + 1] == "0.003"
    assert "--pretrained_learning_rate" not in scratch and scratch[scratch.index("--config_name") + 1] == "PRE"
    for run_flags in (selfie, scratch):
        assert run_flags[run_flags.index("--label_fraction") + 1] == "0.05"
        assert run_flags[run_flags.index("--label_seed") + 1] == "1"


def test_runs_go_seed_by_seed_with_both_methods_in_turn(tmp_path, monkeypatch):
    """A sweep stopped part-way leaves both methods' runs of its first seeds, paired on the same labels."""
    order = []

    def fine_tune(sweep, pretrained, method, fraction, seed):
        order.append((fraction, seed, method))
        return 0.5 + 0.1 * seed

    monkeypatch.setattr(run_sweep, "fine_tune", fine_tune)
    sweep = {"output_dir": str(tmp_path), "label_fractions": [0.05, 0.2], "seeds": [0, 1], "pretrained_model": "PRE"}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    rows = run_sweep.main([str(tmp_path / "sweep.json")])
    assert order == [
        (fraction, seed, method) for fraction in (0.05, 0.2) for seed in (0, 1) for method in ("scratch", "selfie")
    ]
    assert rows[1]["selfie"]["runs"] == pytest.approx([50.0, 60.0]) and rows[1]["delta"] == pytest.approx(0.0)


def test_sigterm_ends_a_sweep_with_the_scripts_line_and_status(tmp_path):
    """The run under way saves a checkpoint and says so in one line; the sweep exits with its status (143)."""
    sweep = {
        "output_dir": str(tmp_path / "out"), "label_fractions": [0.5], "seeds": [0],
        "data": {**TINY_MODEL, "report_to": "none", "disable_tqdm": True, "logging_steps": 1},
        "pretraining": {"max_steps": 1000, "save_steps": 1000, "per_device_train_batch_size": 4},
    }  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    command = [sys.executable, str(REPOSITORY / "run_sweep.py"), str(tmp_path / "sweep.json")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until pretraining trains, its signal handler in place
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "error" in line] == [
        line for line in stderr.splitlines() if line.startswith("run_sweep.py: error: Stopped by SIGTERM at step")
    ]
    assert list((tmp_path / "out" / "pretraining").glob("checkpoint-*"))


def test_a_sections_config_overrides_add_to_the_data_sections(tmp_path):
    sweep = run_sweep.Sweep(
        output_dir=str(tmp_path), data={"config_overrides": "hidden_size=64,num_hidden_layers=2"},
        pretraining={"config_overrides": "masking_strategy=split,num_hidden_layers=3"},
    )  # fmt: skip
    run_flags = run_sweep.pretraining_flags(sweep)
    overrides = run_flags[run_flags.index("--config_overrides") + 1]
    config = build_config(ModelArguments(config_overrides=overrides), "cifar10")
    assert (config.hidden_size, config.masking_strategy, config.num_hidden_layers) == (64, "split", 3)
    selfie = run_sweep.fine_tuning_flags(sweep, "PRE", "selfie", 0.05, 0)  # no section of its own: the data's
    assert selfie[selfie.index("--config_overrides") + 1] == "hidden_size=64,num_hidden_layers=2"


def test_a_sweep_with_a_base_holds_only_what_it_changes(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({
        "output_dir": "BASE", "seeds": [0, 1], "label_fractions": [0.05, 0.2],
        "data": {"config_overrides": "hidden_size=64", "max_eval_samples": 100},
        "finetuning": {"learning_rate": 0.003, "label_smoothing_factor": 0.1},
    }))  # fmt: skip
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "sweep.json").write_text(json.dumps({
        "base": "../base.json", "output_dir": "VARIANT", "seeds": [0, 1, 2],
        "data": {"config_overrides": "masking_strategy=split"}, "finetuning": {"label_smoothing_factor": 0.0},
    }))  # fmt: skip
    sweep = run_sweep.Sweep.from_json(str(tmp_path / "variants" / "sweep.json"))
    assert (sweep.output_dir, sweep.seeds, sweep.label_fractions) == ("VARIANT", [0, 1, 2], [0.05, 0.2])
    assert sweep.data == {"config_overrides": "hidden_size=64,masking_strategy=split", "max_eval_samples": 100}
    assert sweep.finetuning == {"learning_rate": 0.003, "label_smoothing_factor": 0.0}


def test_a_missing_base_is_named(tmp_path):
    (tmp_path / "sweep.json").write_text('{"base": "none.json", "output_dir": "OUT"}')
    message = f"{tmp_path / 'sweep.json'}: base none.json is not a file ({tmp_path / 'none.json'};"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        run_sweep.Sweep.from_json(str(tmp_path / "sweep.json"))


def test_the_summary_gives_the_sample_std_and_no_spread_for_one_seed(tmp_path):
    two = run_sweep.summarise({0.05: {"scratch": [0.40, 0.44], "selfie": [0.50, 0.56]}})
    assert two[0]["selfie"]["std"] == pytest.approx(100 * 0.06 / 2**0.5) and two[0]["delta"] == pytest.approx(11)
    assert "| 5% | 42.0 ± 2.8 | 53.0 ± 4.2 | +11.0 |" in run_sweep.markdown_table(two)

    one = run_sweep.summarise({0.05: {"scratch": [0.40], "selfie": [0.50]}})
    assert one[0]["scratch"]["std"] is None  # undefined, not 0
    table = run_sweep.markdown_table(one)
    assert "| 5% | 40.0 | 50.0 | +10.0 |" in table and "±" not in table.splitlines()[2]
    assert "of one seed" in table
    run_sweep.plot(one, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_runs(monkeypatch) -> list[str]:
    """Stand-ins for the training scripts that write a run's results at once; the folders they ran in, in order."""
    folders = []

    def run(flags):
        output_dir = flags[flags.index("--output_dir") + 1]
        folders.append(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        (Path(output_dir) / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))

    monkeypatch.setattr(run_sweep.pretraining, "main", run)
    monkeypatch.setattr(run_sweep.classification, "main", run)
    return folders


def test_a_rerun_reuses_only_runs_made_with_the_same_settings(tmp_path, monkeypatch):
    folders = fake_runs(monkeypatch)
    sweep = {
        "output_dir": str(tmp_path / "out"), "label_fractions": [0.5], "seeds": [0, 1],
        "pretraining": {"max_steps": 10}, "finetuning": {"learning_rate": 0.001}, "data": {"report_to": "none"},
    }  # fmt: skip
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    run_sweep.main([str(path)])
    assert len(folders) == 5  # pretraining, then 2 seeds x 2 methods
    table = (tmp_path / "out" / "results.md").read_text()

    # The same settings (but for a flag that changes only what is shown), and a seed more: only the new runs run.
    path.write_text(json.dumps({**sweep, "seeds": [0, 1, 2], "data": {"report_to": "tensorboard"}}))
    run_sweep.main([str(path)])
    assert [os.path.basename(folder) for folder in folders[5:]] == ["scratch-0.5-seed2", "selfie-0.5-seed2"]

    # Another learning rate: refused before any run, naming the change; the results stay as they were.
    (tmp_path / "out" / "results.md").write_text(table)
    path.write_text(json.dumps({**sweep, "finetuning": {"learning_rate": 0.003}}))
    fine_tuning_run = tmp_path / "out" / "finetuning" / "scratch-0.5-seed0"
    message = f"{path}: {fine_tuning_run} was made with other settings than this sweep's (learning_rate 0.003, was "
    with pytest.raises(ValueError, match=f"^{re.escape(message)}0.001\\); so do 3 more of its runs"):
        run_sweep.main([str(path)])
    assert len(folders) == 7 and (tmp_path / "out" / "results.md").read_text() == table

    # Other pretraining: the pretraining run and every fine-tuning run that starts from it.
    path.write_text(
        json.dumps({**sweep, "pretraining": {"max_steps": 20, "config_overrides": "masking_strategy=split"}})
    )
    message = (
        f"{tmp_path / 'out' / 'pretraining'} was made with other settings than this sweep's (config_overrides "
        "masking_strategy=split, absent before; max_steps 20, was 10); so do 4 more of its runs"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep.main([str(path)])
    assert len(folders) == 7


def test_runs_made_before_sweeps_recorded_settings_are_reused_and_named(tmp_path, monkeypatch, caplog):
    folders = fake_runs(monkeypatch)
    sweep = {"output_dir": str(tmp_path / "out"), "label_fractions": [0.5], "seeds": [0], "pretrained_model": "PRE"}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    old_run = tmp_path / "out" / "finetuning" / "selfie-0.5-seed0"
    old_run.mkdir(parents=True)
    (old_run / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75}))
    with caplog.at_level("WARNING", logger="selfie_training.sweep"):  # whatever level an earlier run left
        rows = run_sweep.main([str(tmp_path / "sweep.json")])
    assert [os.path.basename(folder) for folder in folders] == ["scratch-0.5-seed0"]
    assert rows[0]["selfie"]["runs"] == [75.0]
    assert f"1 runs of {tmp_path / 'sweep.json'} were made before sweeps recorded their settings" in caplog.text
    assert str(old_run) in caplog.text and not (old_run / run_sweep.SETTINGS_FILE).exists()
