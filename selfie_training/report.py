"""Write docs/results.md, and the results tables of README.md and docs/performance.md, from the result files in
docs/results/.

    make report        # or: python -m selfie_training.report

Every figure comes from a JSON file of docs/results/, and each table names its file and the command recorded in it.
The other documents' tables sit between `<!-- report:NAME -->` and `<!-- /report:NAME -->` lines; the report rewrites
what is between them. tests/scripts/test_report.py fails when a committed document differs from a fresh run.
"""

import json
import sys
from pathlib import Path

from .sweep import markdown_table


REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = REPOSITORY / "docs" / "results"
REPORT = REPOSITORY / "docs" / "results.md"
README = REPOSITORY / "README.md"
PERFORMANCE = REPOSITORY / "docs" / "performance.md"


def load(name: str, results: Path = RESULTS) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def mean_std(summary: dict) -> str:
    return f"{summary['mean']:.1f} ± {summary['std']:.1f}"


def seed_range(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))


def environment(data: dict) -> str:
    """The package versions a JSON records, in one line."""
    recorded = data.get("environment", "not recorded")
    if isinstance(recorded, str):
        return recorded
    return ", ".join(f"{name} {version}" for name, version in recorded.items())


def commands(data: dict) -> list[str]:
    recorded = data.get("command", data.get("commands", []))
    if isinstance(recorded, str):
        return [recorded]
    if isinstance(recorded, dict):
        return [f"{name}: {command}" for name, command in recorded.items()]
    return list(recorded)


def source(name: str, data: dict) -> str:
    """Where a table comes from: its JSON file, the commands recorded there and the package versions."""
    lines = [f"Source: [`docs/results/{name}`](results/{name}); environment: {environment(data)}."]
    lines += ["", "```text", *commands(data), "```"] if commands(data) else []
    return "\n".join(lines)


def plot(name: str, results: Path) -> list[str]:
    """The sweep's plot of accuracy against the labelled share, where it is committed beside its JSON."""
    return [f"![Top-1 accuracy against the labelled share](results/{name})", ""] if (results / name).exists() else []


def comparison_table(rows: list[dict]) -> str:
    """Fine-tuning rows (label_fraction, seeds, scratch and selfie {mean, std}, delta) as a table."""
    lines = ["| labelled | seeds | supervised (scratch) | Selfie | delta |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['label_fraction']:.0%} | {seed_range(row['seeds'])} | {mean_std(row['scratch'])} | "
            f"{mean_std(row['selfie'])} | {row['delta']:+.1f} |"
        )
    return "\n".join(lines)


def objective_table(data: dict) -> str:
    """Selfie's random mask beside SplitMask's split, on one recipe, against the same scratch runs."""
    lines = [
        "| labelled | seeds | supervised (scratch) | Selfie's random mask | delta | SplitMask's split | delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["results"]:
        lines.append(
            f"| {row['label_fraction']:.0%} | {seed_range(row['seeds'])} | {mean_std(row['scratch'])} | "
            f"{mean_std(row['selfie_random_mask'])} | {row['delta']:+.1f} | {mean_std(row['selfie_split'])} | "
            f"{row['split_delta']:+.1f} |"
        )
    return "\n".join(lines)


def cifar10_cpu_rows(data: dict) -> list[dict]:
    return sorted(data["results"].values(), key=lambda row: (row["label_fraction"], len(row["seeds"])))


def cifar10_gpu_rows(data: dict) -> list[dict]:
    tuning = data["fine_tuning_5_percent"]
    return [
        {
            "label_fraction": 0.05,
            "seeds": list(range(len(tuning["selfie"]["per_seed"]))),
            "scratch": tuning["scratch"],
            "selfie": tuning["selfie"],
            "delta": tuning["gain_mean"],
        }
    ]


def readme_tables(results: Path = RESULTS) -> dict[str, str]:
    """The README's results tables, by marker name."""
    tables = {"digits": markdown_table(load("digits.json", results)["results"])}
    tables["cifar10-cpu"] = comparison_table(cifar10_cpu_rows(load("cifar10-cpu-config-aligned.json", results)))
    tables["objectives"] = objective_table(load("cifar10-cpu-random-mask.json", results))
    tables["cifar10-gpu"] = comparison_table(cifar10_gpu_rows(load("cifar10-gpu-short.json", results)))
    return tables


def loop_table(results: Path = RESULTS) -> str:
    """Each training script against its bare step, from the whole-loop throughput files
    (`throughput-cpu-loop-*.json`, written by benchmarks/benchmark_throughput.py)."""
    lines = [
        "| network | input pipeline | memory format | script | images/s (runs) | bare step | x step (rounds) | "
        "in process: x step (runs) | in process: ms/step outside |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    files = [json.loads(path.read_text()) for path in results.glob("throughput-cpu-loop-*.json")]
    # Network by network, the resident pipeline first, the default memory format first.
    files.sort(
        key=lambda data: (
            data["arguments"]["backbone_kwargs"] or "",
            not data["arguments"]["resident_images"],
            data["arguments"]["channels_last"],
        )
    )
    for data in files:
        arguments, by_measurement = data["arguments"], {row["measurement"]: row for row in data["results"]}
        settings = [
            network(arguments),
            "resident" if arguments["resident_images"] else "per image, 1 worker",
            "channels_last" if arguments["channels_last"] else "contiguous",
        ]
        for script, step, name in (
            ("script", "selfie", "pretraining"),
            ("finetune_script", "finetune", "fine-tuning"),
        ):
            row, bare = by_measurement[script], by_measurement[step]
            runs = " / ".join(f"{rate:.0f}" for rate in row["images_per_second_runs"])
            rounds = row["ratio_to_step_runs"]
            lines.append(
                f"| {' | '.join(settings)} | {name} | {row['images_per_second']:.0f} ({runs}) | "
                f"{bare['images_per_second']:.0f} | {row['ratio_to_step']:.3f} ({spread(rounds)}) | "
                f"{in_process(row)} |"
            )
    return "\n".join(lines)


def in_process(row: dict) -> str:
    """A script's in-process ratio to its step (with its runs' spread) and ms/step outside the model: dashes where
    DataLoader workers shared the cores, which the benchmark cannot split."""
    if "in_process_ratio_to_step" not in row:
        return "— | —"
    ratio, outside = row["in_process_ratio_to_step"], row["in_process_ms_per_step_outside_model"]
    return f"{ratio:.3f} ({spread(row['in_process_ratio_to_step_runs'])}) | {outside:.1f}"


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def network(arguments: dict) -> str:
    """A benchmark's network in a few words: its backbone, blocks per stage, channels, and attention width."""
    kwargs = json.loads(arguments["backbone_kwargs"] or "{}")
    overrides = dict(item.split("=") for item in (arguments["config_overrides"] or "").split(",") if item)
    words = [arguments["backbone"]]
    words += ["-".join(map(str, kwargs["layers"])) + " blocks"] if "layers" in kwargs else []
    words += [f"channels {kwargs['channels'][0]}-{kwargs['channels'][-1]}"] if "channels" in kwargs else []
    words += [f"width {overrides['hidden_size']}"] if "hidden_size" in overrides else []
    return ", ".join(words)


GRIDS = {"cifar10": "32x32", "imagenet224": "224x224"}
DATA_MEASUREMENTS = ("decode", "transform", "loader")  # the input pipeline alone, shown on one line a grid


def step_table(data: dict) -> str:
    """A benchmark's steps against the supervised peer's, grid by grid, and its data pipeline on one line."""
    lines = [
        "| grid | measurement | images/s | x peer | GFLOP/image | TFLOP/s | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for grid, size in GRIDS.items():
        rows = {row["measurement"]: row for row in data["results"] if row["grid"] == grid}
        for name, row in rows.items():
            if name in DATA_MEASUREMENTS:
                continue
            ratio = f"{row['ratio_to_peer']:.2f}"
            if "ratio_to_step" in row:
                ratio += f" ({row['ratio_to_step']:.2f}x its step)"
            lines.append(
                f"| {size} | {name} | {row['images_per_second']:.1f} | {ratio} | {row['flops_per_image'] / 1e9:.2f} | "
                f"{row['tflops_per_second']:.3f} | {row['peak_memory_gib']:.2f} |"
            )
        if data_rows := [rows[name] for name in DATA_MEASUREMENTS if name in rows]:
            rates = " / ".join(f"{row['images_per_second']:,.0f}" for row in data_rows)
            names = " / ".join(row["measurement"] for row in data_rows)
            lines.append(f"| {size} | {names} (1 worker) | {rates} | | | | |")
    return "\n".join(lines)


def performance_tables(results: Path = RESULTS) -> dict[str, str]:
    """docs/performance.md's tables, by marker name."""
    return {"loop": loop_table(results), "step": step_table(load("throughput-cpu.json", results))}


# Each document with marked tables, and what writes them.
MARKED_DOCUMENTS = {README: readme_tables, PERFORMANCE: performance_tables}


def digits_section(results: Path) -> list[str]:
    lines = ["## Handwritten digits: `make demo`", ""]
    data = load("digits.json", results)
    return lines + [markdown_table(data["results"]), "", *plot("digits.png", results), source("digits.json", data), ""]


def cifar10_cpu_section(results: Path) -> list[str]:
    name = "cifar10-cpu-config-aligned.json"
    data = load(name, results)
    pretraining, features, wall = data["pretraining"], data["frozen_features"], data["wall_time"]
    by_epoch = ", ".join(f"{value:.2f}" for value in pretraining["validation_candidate_accuracy_by_epoch"])
    rows = [
        f"| {row['label_fraction']:.0%} | {seed_range(row['seeds'])} | "
        f"{min(row['gain_by_seed']):+.2f} to {max(row['gain_by_seed']):+.2f} | {row['paired_gain_standard_error']:.2f} |"
        for row in cifar10_cpu_rows(data)
    ]
    return [
        "## CIFAR-10 on two CPU cores: `configs/cifar10_cpu.json`",
        "",
        "The recommended recipe: SplitMask's split-and-match objective, 6 epochs of pretraining of a small ResNet on",
        "45,000 training images, then fine-tuning on 5% and 20% of the labels of 10,000 of them, both methods on the",
        "same labelled images. Top-1 accuracy (%) on 2,000 held-out validation images, mean ± std over seeds.",
        "",
        comparison_table(cifar10_cpu_rows(data)),
        "",
        "| labelled | seeds | gain by seed | paired standard error of the gain |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- Wall time of the whole config: {wall['config_total_minutes']:.1f} minutes "
        f"({wall['pretraining_step_minutes']:.1f} pretraining, {wall['finetuning_12_runs_minutes']:.1f} for the 12 "
        f"fine-tuning runs), peak memory {wall['peak_resident_memory_gib']:.2f} GiB; {wall['machine']}.",
        f"- Validation candidate accuracy, {pretraining['candidates']} candidates, by epoch: {by_epoch}; "
        f"{pretraining['validation_candidate_accuracy_final_whole_image_statistics']:.2f} as saved.",
        f"- Frozen features: linear probe {features['linear_probe_top1']:.1f} against "
        f"{features['random_weights_linear_probe_top1']:.1f} for random weights ({features['linear_probe_gain']:+.1f}), "
        f"k-NN {features['knn_top1']:.1f}.",
        "",
        *plot("cifar10-cpu-config-aligned.png", results),
        source(name, data),
        "",
        *held_out_section(results),
    ]


def held_out_section(results: Path) -> list[str]:
    name = "cifar10-cpu-held-out.json"
    data = load(name, results)
    lines = [
        "### The same models on the held-out images that no choice saw",
        "",
        "Every choice of recipe was made on the 2,000 validation images; the split holds out 3,000 more.",
        "",
        "| labelled | images scored | supervised (scratch) | Selfie | delta (paired SE) |",
        "|---|---|---|---|---|",
    ]
    for row in data["results"]:
        for subset in ("validation", "others", "all"):
            scores = row[subset]
            lines.append(
                f"| {row['label_fraction']:.0%} | {subset}, {scores['images']:,} | {mean_std(scores['scratch'])} | "
                f"{mean_std(scores['selfie'])} | {scores['gain']:+.1f} ({scores['gain_paired_standard_error']:.2f}) |"
            )
    return lines + ["", f"Seeds {seed_range(data['results'][0]['seeds'])}.", "", source(name, data), ""]


OBJECTIVES = (
    ("Selfie's random mask, 4 of 16", "cifar10-cpu-objectives.json", "selfie", 6),
    ("Selfie's random mask, 4 of 16", "cifar10-cpu-random-mask-10-epochs.json", None, 10),
    ("split-and-match", "cifar10-cpu-objectives.json", "split", 6),
    ("split-and-match", "cifar10-cpu-split-10-epochs.json", None, 10),
    ("split-and-match + InfoNCE, weight 0.1", "cifar10-cpu-objectives.json", "split_contrastive_weight_0.1", 6),
    ("split-and-match + InfoNCE, weight 0.5", "cifar10-cpu-objectives.json", "split_contrastive", 6),
)


def random_mask_section(results: Path) -> list[str]:
    data = load("cifar10-cpu-random-mask.json", results)
    accuracy = data["pretraining"]["validation_candidate_accuracy_by_epoch"]
    return [
        "## CIFAR-10: Selfie's own objective on the recipe (two CPU cores)",
        "",
        objective_table(data),
        "",
        f"Validation candidate accuracy of the random mask's pretraining, epochs 1-{len(accuracy)} (4 candidates): "
        + ", ".join(f"{value:.1f}%" for value in accuracy)
        + ".",
        "",
        source("cifar10-cpu-random-mask.json", data),
        "",
    ]


def objectives_section(results: Path) -> list[str]:
    lines = [
        "## CIFAR-10 pretraining objectives (two CPU cores)",
        "",
        "The CPU network and data as above, fine-tuned for 320 steps without warm-up or label smoothing (the recipe",
        "of the time); 3 seeds. Deltas are against the scratch runs of the same file. k-NN and linear probe: frozen",
        "features of the checkpoint (random weights: 27.0 and 36.1).",
        "",
        "| pretraining objective | epochs | 5% | delta | 20% | delta | k-NN | linear probe | JSON |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = []
    for label, name, key, epochs in OBJECTIVES:
        data = load(name, results)
        entry = data["objectives"][key] if key else data
        tuning = {row["label_fraction"]: row for row in entry.get("fine_tuning", entry.get("results"))}
        features = entry.get("frozen_features") or {}
        scale = 100 if features and features["linear_probe_top1"] < 1 else 1
        probe = (
            f"{scale * features['knn_top1']:.1f} | {scale * features['linear_probe_top1']:.1f}" if features else " | "
        )
        cells = " | ".join(f"{mean_std(tuning[f]['selfie'])} | {tuning[f]['delta']:+.1f}" for f in (0.05, 0.2))
        lines.append(f"| {label} | {epochs} | {cells} | {probe} | [{name}](results/{name}) |")
        names.append(name)
    lines.append("")
    for name in sorted(set(names)):
        lines += [source(name, load(name, results)), ""]
    return lines


def cifar10_gpu_section(results: Path) -> list[str]:
    name = "cifar10-gpu-short.json"
    data = load(name, results)
    pretraining, features = data["pretraining"], data["frozen_features"]
    return [
        "## CIFAR-10 on one GPU: `configs/cifar10_gpu_short.json`",
        "",
        "The paper's setting (ResNet-50, CIFAR stem, 8x8 patches, 4 of 16 hidden, 30 epochs of batch 512) on one",
        f"{data['device']}, then the plain fine-tuning recipe on 5% of the labels. Top-1 accuracy (%) on the 5,000",
        "held-out images. The full config, `configs/cifar10_gpu.json`, has not been run.",
        "",
        comparison_table(cifar10_gpu_rows(data)),
        "",
        f"- Pretraining: {pretraining['steps']:,} steps in {pretraining['train_runtime_s']:.0f} s "
        f"({pretraining['train_images_per_s']:,} images/s); validation candidate accuracy "
        f"({pretraining['candidates']} candidates, chance {pretraining['chance']:.0f}%) "
        f"{pretraining['validation_candidate_accuracy_by_epoch'][-1]:.2f} after the last epoch, "
        f"{pretraining['validation_candidate_accuracy_final_whole_image_statistics']:.2f} as saved.",
        f"- Frozen features: linear probe {features['pretrained']['linear_probe_top1']:.2f} against "
        f"{features['random_weights']['linear_probe_top1']:.2f} for random weights ({features['linear_probe_gain']:+.1f}), "
        f"k-NN {features['pretrained']['knn_top1']:.1f} against {features['random_weights']['knn_top1']:.1f}.",
        "",
        *plot("cifar10-gpu-short.png", results),
        source(name, data),
        "",
    ]


def index_section(results: Path) -> list[str]:
    lines = [
        "## Every result file",
        "",
        "The [research log](research-log.md) says what each lever file measured.",
        "",
        "| file | environment |",
        "|---|---|",
    ]
    for path in sorted(results.glob("*.json")):
        lines.append(f"| [{path.name}](results/{path.name}) | {environment(json.loads(path.read_text()))} |")
    return lines + [""]


def report(results: Path = RESULTS) -> str:
    lines = [
        "# Results",
        "",
        "Generated by `make report` (`python -m selfie_training.report`) from the JSON files in",
        "[`docs/results/`](results/); edit those, not this page. Each table names its file, the command recorded in",
        "it and the package versions that ran it. What was tried on the way: [research-log.md](research-log.md).",
        "",
        *digits_section(results),
        *cifar10_cpu_section(results),
        *random_mask_section(results),
        *objectives_section(results),
        *cifar10_gpu_section(results),
        *index_section(results),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def refresh_tables(text: str, tables: dict[str, str]) -> str:
    """`text` with each `<!-- report:NAME -->` block replaced by its table; blocks without a table stay as they are."""
    for name, table in tables.items():
        start, end = f"<!-- report:{name} -->\n", f"\n<!-- /report:{name} -->"
        if start in text and end in text:
            text = text[: text.index(start) + len(start)] + table + text[text.index(end) :]
    return text


def main(args: list[str] | None = None):
    args = sys.argv[1:] if args is None else args
    if args:
        raise SystemExit("usage: python -m selfie_training.report (writes docs/results.md and the marked tables)")
    REPORT.write_text(report())
    for document, tables in MARKED_DOCUMENTS.items():
        document.write_text(refresh_tables(document.read_text(), tables()))
    names = " and ".join(str(document.relative_to(REPOSITORY)) for document in MARKED_DOCUMENTS)
    print(f"Written: {REPORT.relative_to(REPOSITORY)}, the results tables of {names}")


if __name__ == "__main__":
    main()
