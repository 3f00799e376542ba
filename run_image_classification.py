#!/usr/bin/env python
"""Fine-tune a Selfie classifier, from a Selfie pretraining checkpoint or from scratch, on all or a class-balanced
fraction of the labels, with the transformers `Trainer`.

    python run_image_classification.py --dataset_name uoft-cs/cifar10 --model_name_or_path outputs/selfie-cifar10 \\
        --label_fraction 0.05 --label_seed 0 --do_train --do_eval \\
        --output_dir outputs/cifar10-5pct-selfie

Without --model_name_or_path it trains the same architecture from scratch (give --config_name to copy a
checkpoint's architecture exactly): the supervised baseline. The labelled subset depends on --label_seed alone,
so every method sees the same images. Runs with `python` or `accelerate launch`; `--help` lists the flags.
"""

import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

from modeling_selfie import CLASSIFIER_HEADS, SelfieForImageClassification
from selfie_training.data import (
    DataArguments,
    RandomStream,
    check_labels,
    choose_preset,
    collate_images,
    encode_labels,
    find_image_column,
    find_label_column,
    image_transform,
    labelled_indices,
    load_splits,
    with_image_transform,
)
from selfie_training.metrics import compute_accuracy, top_classes
from selfie_training.runner import (
    ModelArguments,
    build_config,
    build_model,
    find_last_checkpoint,
    load_image_processor,
    load_selfie_config,
    parse_arguments,
    run,
    save_json,
    setup,
    train_and_evaluate,
)
from selfie_training.trainer import SelfieTrainer


logger = logging.getLogger(__name__)


@dataclass
class FineTuningArguments:
    label_fraction: float | None = field(
        default=None, metadata={"help": "Train on this share of the labels of every class, e.g. 0.05."}
    )
    labels_per_class: int | None = field(
        default=None, metadata={"help": "Train on this many labelled images of every class, e.g. 60."}
    )
    label_seed: int = field(default=0, metadata={"help": "Seed of the labelled subset, apart from --seed."})
    classifier_head: str | None = field(
        default=None,
        metadata={
            "help": "resnet: stage 4 + pooling + linear; attention_pooling: the paper's ResNet-36 + attention "
            "pooling. Default: the checkpoint's, else resnet.",
            "choices": list(CLASSIFIER_HEADS),
        },
    )

    def __post_init__(self):
        if self.label_fraction is not None and self.labels_per_class is not None:
            raise ValueError("Give --label_fraction or --labels_per_class, not both.")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ValueError(f"--label_fraction {self.label_fraction} must be in (0, 1].")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ValueError(f"--labels_per_class {self.labels_per_class} must be at least 1.")


def main(args: list[str] | None = None) -> dict:
    model_args, finetuning_args, data_args, training_args = parse_arguments(
        (ModelArguments, FineTuningArguments, DataArguments, TrainingArguments), args
    )
    setup(training_args)
    checkpoint = find_last_checkpoint(training_args)
    set_seed(training_args.seed)

    splits = load_splits(data_args)
    image_column = find_image_column(splits["train"], data_args.image_column_name)
    label_column = find_label_column(splits["train"], data_args.label_column_name)
    train, names = encode_labels(splits["train"], label_column)
    validation, validation_names = encode_labels(splits["validation"], label_column, names)
    if validation_names != names:
        raise ValueError(f"The validation split's classes {validation_names[:10]} differ from train's {names[:10]}.")
    check_labels(train, label_column, names, "train")
    check_labels(validation, label_column, names, "validation")
    if finetuning_args.label_fraction is not None or finetuning_args.labels_per_class is not None:
        if data_args.streaming:
            raise ValueError("--label_fraction and --labels_per_class need the whole training split: drop --streaming.")
        indices = labelled_indices(
            train,
            label_column,
            finetuning_args.label_seed,
            fraction=finetuning_args.label_fraction,
            per_class=finetuning_args.labels_per_class,
        )
        train = train.select(indices)
        logger.info("Labelled subset: %d images (label seed %d).", len(train), finetuning_args.label_seed)
        if training_args.should_save:
            subset = {"label_seed": finetuning_args.label_seed, "train_indices": indices}
            save_json(os.path.join(training_args.output_dir, "labelled_subset.json"), subset)

    preset = choose_preset(data_args, splits["train"], image_column)
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if finetuning_args.classifier_head is not None:
        labels["classifier_head"] = finetuning_args.classifier_head
    if model_args.model_name_or_path is not None and not model_args.ignore_mismatched_sizes:
        check_classes_fit(model_args.model_name_or_path, len(names))
    config = build_config(model_args, preset, **labels)
    model = build_model(SelfieForImageClassification, model_args, config)
    image_processor = load_image_processor(model_args, preset)

    train_transform = image_transform(image_processor, train=True, channel_drop_prob=data_args.channel_drop_prob)
    stream = RandomStream(training_args.seed)
    trainer = SelfieTrainer(
        model=model,
        args=training_args,
        train_dataset=with_image_transform(train, train_transform, image_column, label_column, stream=stream),
        eval_dataset=with_image_transform(validation, image_transform(image_processor, train=False), image_column, label_column),
        data_collator=collate_images,
        data_stream=stream,
        compute_metrics=compute_accuracy,
        preprocess_logits_for_metrics=top_classes,
        max_unreadable_fraction=data_args.max_unreadable_fraction,
        card={
            "task": "classification",
            "dataset": data_args.source,
            "dataset_description": f"{_labelled_share(finetuning_args)} of the training images of {data_args.source} "
            f"({_size(train)}, {len(names)} classes); evaluated on its validation split.",
            "origin": f"pretrained with Selfie ({model_args.model_name_or_path})"
            if model_args.model_name_or_path
            else "trained from scratch",
        },
    )
    return train_and_evaluate(trainer, training_args, image_processor, checkpoint)


def check_classes_fit(checkpoint: str, num_classes: int):
    """A classifier checkpoint must have as many classes as the dataset, unless its head is to start afresh."""
    config = load_selfie_config(checkpoint, "--model_name_or_path")
    if SelfieForImageClassification.__name__ in (config.architectures or []) and config.num_labels != num_classes:
        raise ValueError(
            f"--model_name_or_path {checkpoint} classifies {config.num_labels} classes but the dataset has "
            f"{num_classes}: add --ignore_mismatched_sizes to start the classifier afresh."
        )


def _size(dataset) -> str:
    return f"{len(dataset)} images" if hasattr(dataset, "__len__") else "streamed"


def _labelled_share(args: FineTuningArguments) -> str:
    if args.labels_per_class is not None:
        return f"{args.labels_per_class} labelled images of every class"
    if args.label_fraction is not None:
        return f"A class-balanced {args.label_fraction:.0%} (label seed {args.label_seed})"
    return "All"


if __name__ == "__main__":
    run(main)
