"""The body of `run_sweep.py`: Selfie against training from scratch over label fractions and seeds, the
paper's low-label comparison, from a sweep file (its fields are described in `run_sweep.py`)."""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import matplotlib
import numpy as np

from modeling_selfie.configuration_selfie import is_number

from . import classification, pretraining
from .environment import package_versions
from .errors import UserError
from .model_card import set_section
from .runner import parse_arguments


matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot  # noqa: E402


logger = logging.getLogger(__name__)

METHODS = ("scratch", "selfie")
# In every run's folder: the settings the run was made with, which a rerun of the sweep compares with its own.
SETTINGS_FILE = "sweep_settings.json"
# Flags that change only what a run logs or shows, not what it trains: left out of the settings compared.
DISPLAY_FLAGS = (
    "report_to", "disable_tqdm", "log_level", "log_level_replica", "run_name", "logging_dir", "logging_strategy",
    "logging_steps", "logging_first_step",
)  # fmt: skip


@dataclass
class Sweep:
    output_dir: str
    label_fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: dict = field(default_factory=dict)
    pretraining: dict = field(default_factory=dict)
    finetuning: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    selfie: dict = field(default_factory=dict)
    pretrained_model: str | None = None

    @classmethod
    def from_json(cls, path: str) -> "Sweep":
        """The sweep of a JSON file, on top of its `base`, every setting checked (a one-line error naming the file
        and setting)."""
        settings = read_settings(path)
        if "output_dir" not in settings:
            raise UserError(f"{path}: no output_dir.")
        sweep = cls(**settings)
        sweep.check(path)
        return sweep

    def check(self, path: str):
        if not isinstance(self.output_dir, str):
            raise UserError(f"{path}: output_dir {self.output_dir!r} must be a string.")
        if not self.label_fractions or not all(is_number(f) and 0 < f <= 1 for f in _as_list(self.label_fractions)):
            raise UserError(f"{path}: label_fractions {self.label_fractions!r} must be a list of numbers in (0, 1].")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in _as_list(self.seeds)):
            raise UserError(f"{path}: seeds {self.seeds!r} must be a list of integers.")
        # A repeated seed or fraction names the same run folder twice: one run, read back as two.
        for name, values in (("label_fractions", [f"{f:g}" for f in self.label_fractions]), ("seeds", self.seeds)):
            repeated = sorted({str(value) for value in values if values.count(value) > 1})
            if repeated:
                raise UserError(
                    f"{path}: {name} {getattr(self, name)!r} repeat {', '.join(repeated)}: one run each, which the "
                    "summary would count as several; give each once."
                )
        for name in SECTIONS:
            if not isinstance(getattr(self, name), dict):
                raise UserError(f"{path}: {name} must be an object of flags, not {getattr(self, name)!r}.")
        if self.pretrained_model is not None and not isinstance(self.pretrained_model, str):
            raise UserError(f"{path}: pretrained_model {self.pretrained_model!r} must be a string.")


SECTIONS = ("data", "pretraining", "finetuning", "scratch", "selfie")


def read_settings(path: str, extending: tuple[str, ...] = ()) -> dict:
    """The settings of a sweep file. One that names a `base` (another sweep file, its path relative to this one)
    holds only what it changes: its settings replace the base's, and its sections' flags are added to the base's
    sections (`merged`)."""
    try:
        with open(path) as file:
            settings = json.load(file)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error}).") from error
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(settings, dict):
        raise UserError(f"{path}: holds a JSON {type(settings).__name__}, not an object of sweep settings.")
    unknown = set(settings) - set(Sweep.__dataclass_fields__) - {"base"}
    if unknown:
        raise UserError(
            f"{path}: unknown sweep settings {sorted(unknown)}; known: {sorted(Sweep.__dataclass_fields__)}."
        )
    if "base" not in settings:
        return settings
    base = settings.pop("base")
    if not isinstance(base, str):
        raise UserError(f"{path}: base {base!r} must be the path of a sweep file.")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise UserError(
            f"{path}: base {base} is not a file ({base_path}; a base's path is relative to the file naming it)."
        )
    if os.path.realpath(base_path) in extending:
        raise UserError(f"{path}: base {base} leads back to {path}.")
    inherited = read_settings(base_path, (*extending, os.path.realpath(path)))
    for name in SECTIONS:
        if isinstance(inherited.get(name), dict) and isinstance(settings.get(name), dict):
            settings[name] = merged(inherited[name], settings[name])
    return {**inherited, **settings}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [None]


def flags(settings: dict) -> list[str]:
    """`{"num_train_epochs": 3, "do_train": True, "seeds": [0, 1]}` -> `["--num_train_epochs", "3", ...]`."""
    result = []
    for name, value in settings.items():
        values = value if isinstance(value, list) else [value]
        result += [f"--{name}", *map(str, values)]
    return result


def merged(*sections: dict) -> dict:
    """The settings of `sections`, a later one's winning, but for `config_overrides`, which add up: the pretraining
    section's `masking_strategy=split` adds to the data section's architecture (a later field wins there too)."""
    result = {}
    for section in sections:
        for name, value in section.items():
            if name == "config_overrides" and name in result:
                value = f"{result[name]},{value}"
            result[name] = value
    return result


def pretraining_directory(sweep: Sweep) -> str:
    return os.path.join(sweep.output_dir, "pretraining")


def pretraining_settings(sweep: Sweep) -> dict:
    """The pretraining run's flags but --output_dir."""
    return merged(sweep.data, sweep.pretraining, {"do_train": True, "do_eval": True})


def pretraining_flags(sweep: Sweep) -> list[str]:
    return flags({**pretraining_settings(sweep), "output_dir": pretraining_directory(sweep)})


def pretrain(sweep: Sweep) -> str:
    if sweep.pretrained_model is not None:
        return sweep.pretrained_model
    output_dir = pretraining_directory(sweep)
    if not os.path.exists(os.path.join(output_dir, "all_results.json")):
        claim_run(output_dir, pretraining_record(sweep))
        pretraining.main(pretraining_flags(sweep))
    return output_dir


def fine_tuning_settings(sweep: Sweep, method: str, fraction: float, seed: int) -> dict:
    """A fine-tuning run's flags but --output_dir and the checkpoint it starts from."""
    this_run = {"seed": seed, "label_seed": seed, "do_train": True, "do_eval": True}
    settings = merged(sweep.data, sweep.finetuning, getattr(sweep, method), this_run)
    if fraction < 1:
        settings["label_fraction"] = fraction
    return settings


def fine_tuning_flags(sweep: Sweep, pretrained: str, method: str, fraction: float, seed: int) -> list[str]:
    # The same architecture either way: the checkpoint's weights, or only its config.
    start = "model_name_or_path" if method == "selfie" else "config_name"
    output_dir = run_directory(sweep, method, fraction, seed)
    return flags({**fine_tuning_settings(sweep, method, fraction, seed), "output_dir": output_dir, start: pretrained})


def check_flags(sweep: Sweep, path: str):
    """Parse every run's flags before the first run starts, so that a typo does not surface hours in."""
    runs = (
        []
        if sweep.pretrained_model is not None
        else [("pretraining", pretraining.ARGUMENTS, pretraining_flags(sweep))]
    )
    pretrained = sweep.pretrained_model or os.path.join(sweep.output_dir, "pretraining")
    for method in METHODS:
        runs.append((method, classification.ARGUMENTS, fine_tuning_flags(sweep, pretrained, method, 0.5, 0)))
    for name, arguments, run_flags in runs:
        try:
            parse_arguments(arguments, run_flags)
        except UserError as error:
            raise UserError(f"{path}: the {name} runs' flags are refused: {error}") from error
        except SystemExit as error:  # argparse has printed why
            raise UserError(f"{path}: the {name} runs' flags are refused (argparse's line above says why).") from error


def fine_tune(sweep: Sweep, pretrained: str, method: str, fraction: float, seed: int) -> float:
    """The validation accuracy of one fine-tuning run (read back if it has finished before)."""
    output_dir = run_directory(sweep, method, fraction, seed)
    results_file = os.path.join(output_dir, "all_results.json")
    if not os.path.exists(results_file):
        claim_run(output_dir, fine_tuning_record(sweep, method, fraction, seed))
        classification.main(fine_tuning_flags(sweep, pretrained, method, fraction, seed))
    with open(results_file) as file:
        return json.load(file)["eval_accuracy"]


def pretraining_record(sweep: Sweep) -> dict[str, str]:
    """The settings that make the pretraining run, as its folder's SETTINGS_FILE holds them."""
    return _as_strings(pretraining_settings(sweep))


def fine_tuning_record(sweep: Sweep, method: str, fraction: float, seed: int) -> dict[str, str]:
    """The settings that make a fine-tuning run: its own, and those of the checkpoint it starts from (the sweep's
    pretraining run's, which its folder's path does not tell, or the path of --pretrained_model)."""
    record = _as_strings(fine_tuning_settings(sweep, method, fraction, seed))
    if sweep.pretrained_model is not None:
        return {**record, "pretrained_model": sweep.pretrained_model}
    return {**record, **{f"pretraining.{name}": value for name, value in pretraining_record(sweep).items()}}


def _as_strings(settings: dict) -> dict[str, str]:
    """Each flag's value as the run's command line gives it, but for the flags that only change what it shows."""
    return {name: " ".join(flags({name: value})[1:]) for name, value in settings.items() if name not in DISPLAY_FLAGS}


def planned_runs(sweep: Sweep) -> list[tuple[str, dict[str, str]]]:
    """The folder and the settings record of every run of the sweep."""
    runs = [] if sweep.pretrained_model is not None else [(pretraining_directory(sweep), pretraining_record(sweep))]
    for fraction in sweep.label_fractions:
        for seed in sweep.seeds:
            for method in METHODS:
                record = fine_tuning_record(sweep, method, fraction, seed)
                runs.append((run_directory(sweep, method, fraction, seed), record))
    return runs


def check_reused_runs(sweep: Sweep, path: str):
    """A rerun of a sweep reuses the runs it finds in its folders, which must have been made with its settings: a run
    made with others (another objective, learning rate, number of steps) is refused before the first run, naming
    what changed, since its results would be reported as this sweep's. A run made before sweeps recorded their
    settings cannot be compared: it is reused, named in a warning."""
    changed, unrecorded = [], []
    for output_dir, record in planned_runs(sweep):
        stored = read_record(output_dir)
        if stored is None and _has_run(output_dir):
            unrecorded.append(output_dir)
        elif stored is not None and stored != record:
            changed.append((output_dir, stored, record))
    if changed:
        output_dir, stored, record = changed[0]
        others = f"; so do {len(changed) - 1} more of its runs" if len(changed) > 1 else ""
        raise UserError(
            f"{path}: {output_dir} was made with other settings than this sweep's ({describe_changes(stored, record)})"
            f"{others}: give the sweep another output_dir, or delete those runs to run them again."
        )
    if unrecorded:
        logger.warning(
            "%d runs of %s were made before sweeps recorded their settings in %s, so this sweep cannot tell whether "
            "they were made with its settings; they are reused as they are (delete them to run them again): %s",
            len(unrecorded), path, SETTINGS_FILE, ", ".join(unrecorded),
        )  # fmt: skip


def describe_changes(stored: dict[str, str], record: dict[str, str]) -> str:
    """`learning_rate 0.003, was 0.001; objective split, absent before` for the settings that differ."""
    changes = []
    for name in sorted(stored.keys() | record.keys()):
        if stored.get(name) != record.get(name):
            now = f"{name} {record[name]}" if name in record else f"no {name}"
            changes.append(f"{now}, was {stored[name]}" if name in stored else f"{now}, absent before")
    return "; ".join(changes)


def read_record(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            record = json.load(file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({error}): delete the run's folder to run it again.") from error
    if not isinstance(record, dict):
        raise UserError(f"{path} holds no settings: delete the run's folder to run it again.")
    return record


def _has_run(output_dir: str) -> bool:
    """Whether a run has finished or saved a checkpoint in `output_dir` (a rerun of its script would reuse it)."""
    if not os.path.isdir(output_dir):
        return False
    return any(name == "all_results.json" or name.startswith("checkpoint-") for name in os.listdir(output_dir))


def claim_run(output_dir: str, record: dict[str, str]):
    """Record the settings of the run about to start in `output_dir`, before it starts, so that a rerun of the sweep
    with others finds them even if this one is stopped part-way. A run made before sweeps recorded settings keeps
    none (`check_reused_runs` has warned of it)."""
    if read_record(output_dir) is not None or _has_run(output_dir):
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, SETTINGS_FILE), "w") as file:
        json.dump(record, file, indent=2)


def run_directory(sweep: Sweep, method: str, fraction: float, seed: int) -> str:
    return os.path.join(sweep.output_dir, "finetuning", f"{method}-{fraction:g}-seed{seed}")


def summarise(accuracies: dict) -> list[dict]:
    """Mean and sample standard deviation (in %) of each method at each fraction, and Selfie's gain. One run has no
    standard deviation: it is None (null in results.json), not a spread of 0."""
    rows = []
    for fraction, by_method in accuracies.items():
        row = {"label_fraction": fraction}
        for method, values in by_method.items():
            percent = 100 * np.asarray(values)
            row[method] = {
                "mean": float(percent.mean()),
                "std": float(percent.std(ddof=1)) if len(percent) > 1 else None,
                "runs": [float(v) for v in percent],
            }
        row["delta"] = row["selfie"]["mean"] - row["scratch"]["mean"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| labelled | supervised (scratch) | Selfie | delta |",
        "|---|---|---|---|",
    ]
    for row in rows:
        cells = [mean_and_std(row[method]) for method in METHODS]
        lines.append(f"| {row['label_fraction']:.0%} | {cells[0]} | {cells[1]} | {row['delta']:+.1f} |")
    runs = len(rows[0]["selfie"]["runs"])
    if runs == 1:
        return "\n".join(lines) + "\n\nTop-1 validation accuracy (%) of one seed: add seeds to see how far it moves."
    return "\n".join(lines) + f"\n\nTop-1 validation accuracy (%), mean ± std over {runs} seeds."


def mean_and_std(summary: dict) -> str:
    if summary["std"] is None:
        return f"{summary['mean']:.1f}"
    return f"{summary['mean']:.1f} ± {summary['std']:.1f}"


def plot(rows: list[dict], path: str):
    figure, axes = pyplot.subplots(figsize=(5, 3.5))
    fractions = [100 * row["label_fraction"] for row in rows]
    for method, label in (("scratch", "supervised (scratch)"), ("selfie", "Selfie pretrained")):
        means = [row[method]["mean"] for row in rows]
        stds = [row[method]["std"] for row in rows]
        axes.errorbar(fractions, means, yerr=None if None in stds else stds, marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xticks(fractions, [f"{f:g}%" for f in fractions])
    axes.minorticks_off()
    axes.set_xlabel("labelled share of the training set")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    pyplot.close(figure)


def main(args: list[str] | None = None) -> list[dict]:
    args = sys.argv[1:] if args is None else args
    if len(args) != 1:
        raise UserError("usage: python run_sweep.py SWEEP.json")
    sweep = Sweep.from_json(args[0])
    check_flags(sweep, args[0])
    check_reused_runs(sweep, args[0])
    pretrained = pretrain(sweep)
    accuracies = {fraction: {method: [] for method in METHODS} for fraction in sweep.label_fractions}
    # Seed by seed, both methods in turn: a sweep stopped part-way (a lease, a time limit) leaves pairs to compare.
    for fraction in sweep.label_fractions:
        for seed in sweep.seeds:
            for method in METHODS:
                accuracies[fraction][method].append(fine_tune(sweep, pretrained, method, fraction, seed))
    rows = summarise(accuracies)
    table = markdown_table(rows)
    with open(os.path.join(sweep.output_dir, "results.json"), "w") as file:
        results = {"command": f"python run_sweep.py {args[0]}", "environment": package_versions()}
        json.dump({**results, "pretrained_model": pretrained, "seeds": sweep.seeds, "results": rows}, file, indent=2)
    with open(os.path.join(sweep.output_dir, "results.md"), "w") as file:
        file.write(table + "\n")
    plot(rows, os.path.join(sweep.output_dir, "results.png"))
    cards = [os.path.join(pretrained, "README.md")] + [
        os.path.join(run_directory(sweep, "selfie", fraction, seed), "README.md")
        for fraction in sweep.label_fractions
        for seed in sweep.seeds
    ]
    for card in filter(os.path.exists, cards):
        set_section(card, "comparison", table)
    print(f"\n{table}\n\nWritten to {sweep.output_dir}: results.json, results.md, results.png")
    return rows
