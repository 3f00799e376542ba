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
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

from modeling_selfie import CLASSIFIER_HEADS, SelfieForImageClassification
from selfie_training.data import (
    DataArguments,
    LabelledSubsetArguments,
    RandomStream,
    choose_preset,
    collate_images,
    encode_label_splits,
    find_image_column,
    find_label_column,
    image_transform,
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
    save_labelled_subset,
    setup,
    train_and_evaluate,
)
from selfie_training.trainer import SelfieTrainer


logger = logging.getLogger(__name__)


@dataclass
class FineTuningArguments(LabelledSubsetArguments):
    classifier_head: str | None = field(
        default=None,
        metadata={
            "help": "resnet: stage 4 + pooling + linear; attention_pooling: the paper's ResNet-36 + attention "
            "pooling. Default: the checkpoint's, else resnet.",
            "choices": list(CLASSIFIER_HEADS),
        },
    )
    pretrained_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "The learning rate of the pretrained weights (the patch network, and A for the attention_pooling "
            "head); the fresh head (stage 4 and classifier) trains at --learning_rate. Lower keeps more of what "
            "pretraining learnt. Needs --model_name_or_path or --backbone_weights. Default: --learning_rate."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pretrained_learning_rate is not None and not self.pretrained_learning_rate >= 0:
            raise ValueError(f"--pretrained_learning_rate {self.pretrained_learning_rate} must be at least 0.")


# The script's flags, as dataclasses (run_sweep.py checks a sweep's flags against them before running it).
ARGUMENTS = (ModelArguments, FineTuningArguments, DataArguments, TrainingArguments)


def main(args: list[str] | None = None) -> dict:
    model_args, finetuning_args, data_args, training_args = parse_arguments(ARGUMENTS, args)
    setup(training_args)
    pretrained = model_args.model_name_or_path is not None or model_args.backbone_weights is not None
    if finetuning_args.pretrained_learning_rate is not None and not pretrained:
        raise ValueError(
            "--pretrained_learning_rate needs pretrained weights (--model_name_or_path or --backbone_weights); "
            "without them every weight is fresh and trains at --learning_rate."
        )
    checkpoint = find_last_checkpoint(training_args)
    set_seed(training_args.seed)

    splits = load_splits(data_args)
    image_column = find_image_column(splits["train"], data_args.image_column_name)
    label_column = find_label_column(splits["train"], data_args.label_column_name)
    train, validation, names = encode_label_splits(splits["train"], splits["validation"], label_column)
    train, indices = finetuning_args.select(train, label_column)
    if indices is not None and training_args.should_save:
        save_labelled_subset(training_args.output_dir, finetuning_args.label_seed, indices)

    preset = choose_preset(data_args, splits["train"], image_column)
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if finetuning_args.classifier_head is not None:
        labels["classifier_head"] = finetuning_args.classifier_head
    if model_args.model_name_or_path is not None and not model_args.ignore_mismatched_sizes:
        check_classes_fit(model_args.model_name_or_path, len(names))
    stage = {"task": "classification", "dataset": data_args.source} if training_args.do_train else None
    config = build_config(model_args, preset, stage, **labels)
    image_processor = load_image_processor(model_args, preset, config)
    model = build_model(SelfieForImageClassification, model_args, config)

    train_transform = image_transform(image_processor, train=True, channel_drop_prob=data_args.channel_drop_prob)
    stream = RandomStream(training_args.seed)
    trainer = SelfieTrainer(
        model=model,
        args=training_args,
        train_dataset=with_image_transform(train, train_transform, image_column, label_column, stream=stream),
        eval_dataset=with_image_transform(
            validation, image_transform(image_processor, train=False), image_column, label_column
        ),
        data_collator=collate_images,
        data_stream=stream,
        compute_metrics=compute_accuracy,
        preprocess_logits_for_metrics=top_classes,
        max_unreadable_fraction=data_args.max_unreadable_fraction,
        pretrained_learning_rate=finetuning_args.pretrained_learning_rate,
        card={
            "task": "classification",
            "dataset": data_args.source,
            "dataset_description": f"{finetuning_args.describe()} of the training images of {data_args.source} "
            f"({_size(train)}, {len(names)} classes); evaluated on its validation split.",
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


if __name__ == "__main__":
    run(main)
