"""The body of `run_evaluation.py`: the k-NN and linear-probe accuracy of a Selfie patch network's frozen features
on a labelled dataset, written to JSON and into the checkpoint's model card."""

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from datasets import IterableDataset
from transformers import TrainingArguments, set_seed
from transformers.utils import CONFIG_NAME

from .checkpoints import saved_model_class
from .data import (
    DataArguments,
    LabelledSubsetArguments,
    choose_preset,
    labelled_splits,
    load_splits,
)
from .errors import UserError
from .evaluation import (
    KNNArguments,
    extract_features,
    knn_accuracy,
    labelled_images,
    linear_probe_accuracy,
    recalibrate_batchnorm,
)
from .model_card import frozen_feature_results, set_frozen_feature_results, set_section
from .runner import (
    ModelArguments,
    build_config,
    build_model,
    check_preset_applies,
    load_image_processor,
    parse_arguments,
    save_json,
    save_labelled_subset,
    setup,
)


logger = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear_probe")


@dataclass
class EvaluationArguments(KNNArguments):
    protocols: list[str] = field(
        default_factory=lambda: list(PROTOCOLS), metadata={"help": "The protocols to run.", "choices": list(PROTOCOLS)}
    )
    probe_weight_decay: float = field(
        default=1e-4,
        metadata={
            "help": "Linear probe: the L2 penalty, weight_decay / 2 * |W|^2 beside the mean cross-entropy (scikit-learn's "
            "1 / (C * n): the default is C = 1 for 10,000 images)."
        },
    )
    probe_max_iterations: int = field(default=1000, metadata={"help": "Linear probe: at most this many L-BFGS steps."})
    recalibrate_batchnorm: bool = field(
        default=False,
        metadata={
            "help": "Before extracting features, re-estimate the patch network's BatchNorm statistics on the training "
            "images (whole images under the evaluation transform, labels unread). A pretraining checkpoint's "
            "statistics describe patches; the random-init baseline's are those of initialisation. Off: the statistics "
            "as saved."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.probe_weight_decay >= 0:
            raise UserError(f"--probe_weight_decay {self.probe_weight_decay} must be at least 0.")
        if self.probe_max_iterations < 1:
            raise UserError(f"--probe_max_iterations {self.probe_max_iterations} must be at least 1.")
        self._check_settings_of_protocols_run()

    def _check_settings_of_protocols_run(self):
        """A protocol's settings, given where --protocols leaves it out, would do nothing: refused."""
        settings = {
            "knn": ("knn_k", "knn_temperature"),
            "linear_probe": ("probe_weight_decay", "probe_max_iterations"),
        }
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for protocol, names in settings.items():
            given = [f"--{name}" for name in names if getattr(self, name) != defaults[name]]
            if given and protocol not in self.protocols:
                raise UserError(
                    f"{' and '.join(given)} set the {protocol} protocol, which --protocols {' '.join(self.protocols)} "
                    f"leaves out: add {protocol} to --protocols, or drop {'them' if len(given) > 1 else 'it'}."
                )


def main(args: list[str] | None = None) -> dict:
    model_args, subset_args, eval_args, data_args, training_args = parse_arguments(
        (ModelArguments, LabelledSubsetArguments, EvaluationArguments, DataArguments, TrainingArguments), args
    )
    check_not_a_models_folder(training_args.output_dir)
    setup(training_args)
    model, train_images, validation_images, names, indices = load_model_and_images(
        model_args, subset_args, data_args, training_args
    )
    if eval_args.recalibrate_batchnorm and model.config.backbone_norm != "batchnorm":
        raise UserError(
            f"--recalibrate_batchnorm re-estimates the patch network's BatchNorm statistics, but its backbone_norm is "
            f"{model.config.backbone_norm!r}, which keeps no statistics of the data: drop the flag."
        )
    start = time.perf_counter()
    loading = {
        "batch_size": training_args.per_device_eval_batch_size,
        "num_workers": training_args.dataloader_num_workers,
    }
    if eval_args.recalibrate_batchnorm:
        layers = recalibrate_batchnorm(model, train_images, **loading)
        logger.info("Re-estimated the statistics of %d BatchNorm layers on %d images.", layers, len(train_images))
    train_features, test_features = (
        extract_features(model, images, **loading).to(training_args.device)
        for images in (train_images, validation_images)
    )
    for split, features in (("training", train_features), ("validation", test_features)):
        check_finite(features.features, split, model_args)
    results = evaluate(train_features, test_features, len(names), eval_args)
    results.update(
        batchnorm_recalibrated=eval_args.recalibrate_batchnorm,
        train_samples=len(train_features.labels),
        eval_samples=len(test_features.labels),
        eval_runtime=round(time.perf_counter() - start, 2),
    )
    if training_args.should_log:
        print(
            "***** frozen-feature evaluation *****",
            *(f"  {name} = {value}" for name, value in results.items()),
            sep="\n",
        )
    if training_args.should_save:
        save_results(results, training_args.output_dir)
        subset_file = os.path.join(training_args.output_dir, "labelled_subset.json")
        if indices is not None:
            save_labelled_subset(training_args.output_dir, subset_args.label_seed, indices)
        elif os.path.exists(subset_file):  # an earlier evaluation's subset: these figures are of every image
            os.remove(subset_file)
        card = os.path.join(model_args.model_name_or_path or "", "README.md")
        if model_args.model_name_or_path is not None and os.path.isfile(card):
            set_section(card, "frozen_features", results_markdown(results, eval_args, subset_args, data_args.source))
            # The same figures in the card's YAML header, where the Hub reads results (`model-index`).
            settings = {
                "knn": {"k": results.get("knn_k"), "temperature": eval_args.knn_temperature},
                "linear_probe": {"weight_decay": eval_args.probe_weight_decay},
            }
            set_frozen_feature_results(
                card, frozen_feature_results(results, data_args.source, data_args.evaluation_split, settings)
            )
            logger.info("Wrote the figures into %s.", card)
    return results


def check_not_a_models_folder(output_dir: str):
    """The evaluation writes eval_results.json and all_results.json (the names the Trainer gives them) and
    labelled_subset.json: in a trained model's folder, the checkpoint's own say, they would replace those of the
    training that made it. Refused before any work."""
    if os.path.isfile(os.path.join(output_dir, CONFIG_NAME)):
        raise UserError(
            f"--output_dir {output_dir} holds a model (its config.json): this evaluation's eval_results.json, "
            "all_results.json and labelled_subset.json would replace its training's. Give a folder of its own; the "
            "figures also go into the evaluated checkpoint's model card."
        )


def load_model_and_images(model_args, subset_args, data_args, training_args) -> tuple:
    """The model to evaluate (the checkpoint, or --config_name's architecture with fresh weights drawn with --seed) on
    the training device; the labelled training images (all, or the subset asked for) and validation images, as
    `extract_features` reads them; the class names; and the subset's indices (None for all)."""
    set_seed(training_args.seed)  # the random-init baseline's weights
    if (model_args.model_name_or_path is None) == (model_args.config_name is None):
        raise UserError(
            "Give --model_name_or_path (a Selfie checkpoint to evaluate) or --config_name (its architecture with "
            "fresh weights: the random-init baseline), one of the two."
        )
    splits = load_splits(data_args, token=model_args.token)
    train, validation, image_column, label_column, names = labelled_splits(splits, data_args)
    train, indices = subset_args.select(train, label_column)
    check_training_classes(train, label_column, data_args)
    preset = choose_preset(data_args, splits["train"], image_column)
    config = build_config(model_args, preset)
    image_processor = load_image_processor(model_args, preset, config)
    check_preset_applies(data_args.preset, model_args, config, image_processor)
    model = build_model(saved_model_class(config), model_args, config).to(training_args.device)
    train_images, validation_images = (
        labelled_images(split, image_processor, image_column, label_column) for split in (train, validation)
    )
    return model, train_images, validation_images, names, indices


def check_training_classes(train, label_column: str, data_args):
    """The k-NN and the linear probe compare classes: they need labelled training images of at least 2 of them. (A
    single training image also gave the probe a NaN standardisation, which ended in an overflow in L-BFGS.)"""
    if isinstance(train, IterableDataset):  # a stream is not counted
        return
    classes = len(set(train[label_column]))
    if classes < 2:
        limit = f" (--max_train_samples {data_args.max_train_samples})" if data_args.max_train_samples else ""
        raise UserError(
            f"The training images{limit} are of {classes} class: the k-NN and the linear probe need training "
            "images of at least 2 classes."
        )


def check_finite(features: torch.Tensor, split: str, model_args: ModelArguments):
    """NaN or infinite features would give the k-NN arbitrary neighbours, a meaningless accuracy, and break the
    probe's solver: refused before anything is written. (load_checkpoint refuses non-finite weights; finite ones
    can still overflow float32.)"""
    if not torch.isfinite(features).all():
        flag = "--model_name_or_path" if model_args.model_name_or_path is not None else "--config_name"
        raise UserError(
            f"{flag} {model_args.model_name_or_path or model_args.config_name} gives NaN or infinite features for the "
            f"{split} images; nothing was written."
        )


def evaluate(train, test, num_classes: int, args: EvaluationArguments) -> dict:
    results = {}
    if "knn" in args.protocols:
        k = min(args.knn_k, len(train.labels))  # the k that votes: no more neighbours than training images
        results.update(knn_accuracy(train, test, num_classes, k=k, temperature=args.knn_temperature))
        results.update(knn_k=k, knn_temperature=args.knn_temperature)
    if "linear_probe" in args.protocols:
        results.update(
            linear_probe_accuracy(
                train,
                test,
                num_classes,
                weight_decay=args.probe_weight_decay,
                max_iterations=args.probe_max_iterations,
            )
        )
        results.update(linear_probe_weight_decay=args.probe_weight_decay)
    return results


def save_results(results: dict, output_dir: str):
    # The names the Trainer gives an evaluation's figures, so that tools reading those read these.
    for name in ("eval_results.json", "all_results.json"):
        save_json(os.path.join(output_dir, name), results)


def results_markdown(
    results: dict, args: EvaluationArguments, subset_args: LabelledSubsetArguments, source: str
) -> str:
    """The model card's table: top-1 and top-5 accuracy (%) of each protocol run."""
    names = {
        "knn": f"k-NN (k={results.get('knn_k')}, temperature {args.knn_temperature})",
        "linear_probe": f"linear probe (L-BFGS, weight decay {args.probe_weight_decay:g})",
    }
    subset = f", {subset_args.describe().lower()}" if subset_args.selects_subset else ""
    recalibrated = ", its BatchNorm statistics re-estimated on those images" if args.recalibrate_batchnorm else ""
    rows = [
        f"| {names[protocol]} | {_percent(results[f'{protocol}_top1'])} | {_percent(results.get(f'{protocol}_top5'))} |"
        for protocol in args.protocols
    ]
    return "\n".join(
        [
            "| protocol | top-1 | top-5 |",
            "|---|---|---|",
            *rows,
            "",
            f"Accuracy (%) on {results['eval_samples']} validation images of {source}, from the frozen patch network: "
            "its stage-3 feature map of the whole image, average-pooled"
            f"{recalibrated}. Memory bank and probe training set: "
            f"{results['train_samples']} labelled training images{subset}. Written by run_evaluation.py.",
        ]
    )


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}"
