#!/usr/bin/env python
"""A sweep's fine-tuned models scored on every image its split holds out: the validation images that the runs report
(the first --max_eval_samples of them), and the others, which no run trained on and no choice made on the validation
images ever saw. Then how far the seeds' spread moves with the held-out images that score the runs.

    python -m benchmarks.held_out_accuracy configs/cifar10_cpu.json

Every finished fine-tuning run of the sweep (run_sweep.py's folders in its output_dir) is scored image by image on
all the held-out images, which the sweep's flags define (its dataset, --train_val_split, --split_seed); its accuracy
on the validation images must equal its own eval_results.json, or the images are not the ones it was scored on. For
each fraction, over the seeds both methods finished: mean and std of each method on the validation images, on the
others and on all, Selfie's gain with its paired standard error, and each method's std over `--draws` random draws of
as many held-out images as the validation set has. Writes `held_out.json` into the sweep's output_dir and prints it.
"""

import argparse
import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor

from modeling_selfie import SelfieForImageClassification
from selfie_training import classification
from selfie_training.checkpoints import load_checkpoint
from selfie_training.data import (
    collate_images,
    image_transform,
    labelled_splits,
    limit_samples,
    load_splits,
    with_image_transform,
)
from selfie_training.errors import UserError
from selfie_training.runner import int_at_least, parse_arguments, run
from selfie_training.sweep import METHODS, Sweep, fine_tuning_flags, run_directory


PARTS = ("validation", "others", "all")


def held_out_images(sweep: Sweep) -> tuple:
    """All the images that the sweep's fine-tuning runs hold out, in the order --max_eval_samples draws them (so its
    first ones are the runs' validation images), with their image and label columns and that number."""
    run_flags = fine_tuning_flags(sweep, "pretrained", "scratch", 0.5, 0)
    data_args = parse_arguments(classification.ARGUMENTS, run_flags)[2]
    validation_size, data_args.max_eval_samples = data_args.max_eval_samples, None
    if data_args.streaming:
        raise UserError("a streamed dataset has no held-out split to score image by image.")
    held_out, image_column, label_column = labelled_splits(load_splits(data_args), data_args)[1:4]
    if validation_size is None or validation_size >= len(held_out):
        raise UserError(f"the runs were scored on all {len(held_out)} held-out images: none is left over.")
    # All of them, drawn as --max_eval_samples draws its first ones.
    ordered = limit_samples(held_out, len(held_out), data_args.split_seed)
    return ordered, image_column, label_column, validation_size


@torch.inference_mode()
def hits_by_image(folder: str, held_out, image_column: str, label_column: str, batch_size: int) -> np.ndarray:
    """Whether the model in `folder` classifies each held-out image right, under its own evaluation transform."""
    model = load_checkpoint(SelfieForImageClassification, folder).eval()
    transform = image_transform(AutoImageProcessor.from_pretrained(folder), train=False)
    images = with_image_transform(held_out, transform, image_column, label_column)
    hits = []
    for batch in DataLoader(images, batch_size=batch_size, collate_fn=collate_images):
        if batch["unreadable_images"]:
            raise UserError(f"unreadable held-out images, which cannot be scored: {batch['unreadable_images']}.")
        hits.append((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).numpy())
    return np.concatenate(hits)


def score_runs(sweep: Sweep, held_out, image_column, label_column, validation_size, batch_size) -> dict:
    """{(method, fraction, seed): hits by image} for every finished run, each checked against its eval_results.json."""
    hits = {}
    for fraction in sweep.label_fractions:
        for seed in sweep.seeds:
            for method in METHODS:
                folder = run_directory(sweep, method, fraction, seed)
                if not os.path.exists(os.path.join(folder, "eval_results.json")):
                    continue  # not run, or not finished
                with open(os.path.join(folder, "eval_results.json")) as file:
                    reported = json.load(file)["eval_accuracy"]
                run_hits = hits_by_image(folder, held_out, image_column, label_column, batch_size)
                validation_accuracy = run_hits[:validation_size].mean()
                if abs(validation_accuracy - reported) > 1e-6:
                    raise UserError(
                        f"{folder} scores {validation_accuracy:.4f} on the first {validation_size} "
                        f"held-out images but reported {reported:.4f}: they are not the images it was scored on."
                    )
                hits[method, fraction, seed] = run_hits
    return hits


def summarise(hits: dict, validation_size: int, draws: int, seed: int = 0) -> list[dict]:
    """For each fraction, over the seeds that both methods finished (two at least): the accuracies (%) on each part of
    the held-out images, Selfie's gain, and the seeds' std over `draws` random draws of `validation_size` images."""
    generator = np.random.default_rng(seed)
    rows = []
    for fraction in sorted({fraction for _, fraction, _ in hits}):
        seeds = sorted({s for m, f, s in hits if f == fraction and all((n, f, s) in hits for n in METHODS)})
        if len(seeds) < 2:
            continue
        # method -> seeds x images, 1.0 where the run classified the image right
        by_method = {m: np.stack([hits[m, fraction, s] for s in seeds]).astype(float) for m in METHODS}
        parts = {"validation": slice(0, validation_size), "others": slice(validation_size, None), "all": slice(None)}
        row = {"label_fraction": fraction, "seeds": seeds}
        for part, images in parts.items():
            row[part] = compare({m: 100 * runs[:, images].mean(axis=1) for m, runs in by_method.items()})
            row[part]["images"] = by_method["scratch"][:, images].shape[1]
        row["std_over_draws"] = std_over_draws(by_method, validation_size, draws, generator)
        rows.append(row)
    return rows


def compare(accuracy: dict) -> dict:
    """Each method's mean and std over seeds, and Selfie's gain, seed by seed and with its paired standard error."""
    gain = accuracy["selfie"] - accuracy["scratch"]
    return {
        **{
            m: {"mean": runs.mean(), "std": runs.std(ddof=1), "runs": runs.round(2).tolist()}
            for m, runs in accuracy.items()
        },
        "gain": gain.mean(),
        "gain_paired_standard_error": gain.std(ddof=1) / np.sqrt(len(gain)),
        "gain_by_seed": gain.round(2).tolist(),
    }


def std_over_draws(by_method: dict, size: int, draws: int, generator) -> dict:
    """Each method's std over seeds, on `draws` random draws of `size` of the held-out images: its 5th percentile,
    median and 95th percentile, and how often Selfie's is at most scratch's."""
    stds = {m: np.empty(draws) for m in by_method}
    for draw in range(draws):
        images = generator.choice(by_method["scratch"].shape[1], size, replace=False)
        for m, runs in by_method.items():
            stds[m][draw] = (100 * runs[:, images].mean(axis=1)).std(ddof=1)
    return {
        **{
            m: dict(zip(("p5", "median", "p95"), np.percentile(s, [5, 50, 95]).tolist(), strict=True))
            for m, s in stds.items()
        },
        "draws": draws,
        "share_with_selfie_at_most_scratch": float(np.mean(stds["selfie"] <= stds["scratch"])),
    }


def report(rows: list[dict]) -> str:
    lines = ["| labelled | images | scratch | Selfie | gain (paired SE) |", "|---|---|---|---|---|"]
    for row in rows:
        for part in PARTS:
            figures = row[part]
            cells = [f"{figures[m]['mean']:.2f} ± {figures[m]['std']:.2f}" for m in METHODS]
            lines.append(
                f"| {row['label_fraction']:.0%} | {part} ({figures['images']}) | {cells[0]} | {cells[1]} | "
                f"{figures['gain']:+.2f} ({figures['gain_paired_standard_error']:.2f}) |"
            )
    lines.append(
        "\nTop-1 accuracy (%), mean ± std over seeds. The seeds' std on random draws of as many held-out images"
    )
    lines.append("as the validation set (5th percentile, median, 95th percentile):")
    for row in rows:
        draws = row["std_over_draws"]
        spreads = "; ".join(
            f"{m} {draws[m]['p5']:.2f}, {draws[m]['median']:.2f}, {draws[m]['p95']:.2f}" for m in METHODS
        )
        lines.append(
            f"- {row['label_fraction']:.0%}: {spreads}; Selfie's at most scratch's in "
            f"{draws['share_with_selfie_at_most_scratch']:.0%} of {draws['draws']} draws"
        )
    return "\n".join(lines)


def main(args: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="The sweep file the runs were made with (run_sweep.py's).")
    parser.add_argument(
        "--draws", type=int_at_least(1), default=2000, help="Random draws of held-out images for the spread."
    )
    parser.add_argument("--batch_size", type=int_at_least(1), default=500)
    args = parser.parse_args(args)
    sweep = Sweep.from_json(args.sweep)
    held_out, image_column, label_column, validation_size = held_out_images(sweep)
    hits = score_runs(sweep, held_out, image_column, label_column, validation_size, args.batch_size)
    rows = summarise(hits, validation_size, args.draws)
    with open(os.path.join(sweep.output_dir, "held_out.json"), "w") as file:
        json.dump({"sweep": args.sweep, "validation_images": validation_size, "results": rows}, file, indent=1)
    print(report(rows))
    return rows


if __name__ == "__main__":
    run(main)
