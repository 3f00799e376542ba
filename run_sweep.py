#!/usr/bin/env python
"""Selfie against training from scratch, over label fractions and seeds: the paper's low-label comparison.

    python run_sweep.py configs/digits.json

The JSON file names an `output_dir`, the `label_fractions` and `seeds`, and the flags of the runs: `data` for
every run, `pretraining` for run_pretraining.py (skipped when `pretrained_model` names a checkpoint),
`finetuning` for every run_image_classification.py run, and `scratch` and `selfie` for one method's runs only (each
method's own recipe, e.g. `--pretrained_learning_rate` for Selfie); a section's flags override the data section's,
except `config_overrides`, whose fields are added to the data section's. A file that names a `base` sweep file
(relative to it) holds only what it changes. For every fraction and seed, both methods
fine-tune on the same class-balanced labelled subset (label seed = seed): "selfie" from the pretrained checkpoint,
"scratch" from fresh weights of the same architecture. Every setting and flag is checked before the first run.
Every run's folder records the settings it was made with (`sweep_settings.json`): a rerun skips the runs that have
finished with its settings, and refuses, before the first run, a folder whose run was made with others.

Writes `results.json`, `results.md` (mean +- std of the validation accuracy, and the difference) and
`results.png` into `output_dir`, puts the table into the model cards of the pretrained checkpoint and of the
Selfie-fine-tuned models, and prints it.
"""

from selfie_training.runner import run
from selfie_training.sweep import main


if __name__ == "__main__":
    run(main)
