"""Fine-tuning a Selfie classifier with the transformers `Trainer`: the body of `run_image_classification.py`."""

import logging
from dataclasses import dataclass, field

from timm.data import Mixup
from torch import nn
from transformers import TrainingArguments, set_seed

from modeling_selfie import CLASSIFIER_HEADS, SelfieForImageClassification

from .checkpoints import find_last_checkpoint, load_selfie_config, output_dir_lock, saved_model_class
from .data import (
    DataArguments,
    LabelledSubsetArguments,
    choose_preset,
    labelled_splits,
    load_splits,
)
from .errors import UserError
from .metrics import compute_accuracy, top_classes
from .resident_images import ImageSplits, image_pipeline
from .runner import (
    ModelArguments,
    build_config,
    build_model,
    check_preset_applies,
    check_there_is_work,
    load_image_processor,
    parse_arguments,
    save_labelled_subset,
    setup,
    train_and_evaluate,
    training_stages,
)
from .trainer import ClassificationTrainer


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
            "help": "The learning rate of the pretrained weights (the patch network, and the attention pooling "
            "network for the attention_pooling head); the fresh head (stage 4 and classifier) trains at --learning_rate. Lower keeps more of what "
            "pretraining learnt. Needs --model_name_or_path or --backbone_weights. Default: --learning_rate."
        },
    )
    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning rate decay: the patch network's stage 3 trains at --pretrained_learning_rate, each stage "
            "below at this factor times the rate of the one above (stage 2 once, stage 1 twice, the stem three "
            "times), so that the more general lower layers move less. 1: no decay. Needs --model_name_or_path or "
            "--backbone_weights."
        },
    )
    freeze_pretrained_steps: int = field(
        default=0,
        metadata={
            "help": "Hold the pretrained weights still for this many first steps while the fresh head learns to read "
            "their features (LP-FT), then warm them up over --warmup_steps into the schedule. Needs "
            "--model_name_or_path or --backbone_weights."
        },
    )
    freeze_pretrained_batchnorm: bool = field(
        default=False,
        metadata={
            "help": "Normalise the patch network with the BatchNorm statistics of the pretrained weights (for a checkpoint re-estimated "
            "with --batchnorm_recalibration_samples: those of whole images) throughout fine-tuning, rather than with "
            "each batch's, and leave them as they are; their scale and shift still train. Needs --model_name_or_path "
            "or --backbone_weights."
        },
    )
    trivial_augment: bool = field(
        default=False,
        metadata={
            "help": "TrivialAugment (Mueller & Hutter 2021) on the training images: one of 14 operations (colour, "
            "contrast, shear, rotation, ...) at a random strength, after the crop and flip. Stronger augmentation "
            "for few labels; fine-tuning only (pretraining's patch-placing task would read its borders)."
        },
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Mixup (Zhang et al. 2018): each training batch is blended with itself in reverse order, at a "
            "ratio drawn from Beta(alpha, alpha), and trained on the blended labels. 0: off."
        },
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={
            "help": "CutMix (Yun et al. 2019): a box of each training image is pasted from its partner's, its area "
            "drawn from Beta(alpha, alpha), the labels blended by area. 0: off. With --mixup_alpha too, each batch "
            "takes one of the two at random."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.pretrained_learning_rate is not None and not self.pretrained_learning_rate >= 0:
            raise UserError(f"--pretrained_learning_rate {self.pretrained_learning_rate} must be at least 0.")
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer_decay {self.layer_decay} must be more than 0 and at most 1.")
        if self.freeze_pretrained_steps < 0:
            raise UserError(f"--freeze_pretrained_steps {self.freeze_pretrained_steps} must be at least 0.")
        for flag in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, flag) >= 0:
                raise UserError(f"--{flag} {getattr(self, flag)} must be at least 0.")

    def mixing(self, label_smoothing: float, num_classes: int) -> Mixup | None:
        """timm's `Mixup` for these flags (the soft targets it makes carry `label_smoothing`), or None: no mixing."""
        if not (self.mixup_alpha or self.cutmix_alpha):
            return None
        return Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )


# The script's flags, as dataclasses (run_sweep.py checks a sweep's flags against them before running it).
ARGUMENTS = (ModelArguments, FineTuningArguments, DataArguments, TrainingArguments)


def main(args: list[str] | None = None) -> dict:
    arguments = parse(args)
    training_args = arguments[-1]
    with output_dir_lock(training_args):
        trainer, image_processor = build_trainer(*arguments)
        return train_and_evaluate(trainer, training_args, image_processor, find_last_checkpoint(training_args))


def parse(args: list[str] | None = None) -> tuple:
    """The script's arguments, checked as a whole, with logging set up."""
    model_args, finetuning_args, data_args, training_args = parse_arguments(ARGUMENTS, args)
    check_there_is_work(training_args)
    setup(training_args)
    pretrained = model_args.model_name_or_path is not None or model_args.backbone_weights is not None
    flags_for_pretrained_weights = {
        "pretrained_learning_rate": finetuning_args.pretrained_learning_rate is not None,
        "layer_decay": finetuning_args.layer_decay != 1,
        "freeze_pretrained_steps": finetuning_args.freeze_pretrained_steps > 0,
        "freeze_pretrained_batchnorm": finetuning_args.freeze_pretrained_batchnorm,
    }
    for flag, given in flags_for_pretrained_weights.items():
        if given and not pretrained:
            raise UserError(
                f"--{flag} needs pretrained weights (--model_name_or_path or --backbone_weights); "
                "without them every weight is fresh and trains at --learning_rate."
            )
    mixing = [f"--{flag}" for flag in ("mixup_alpha", "cutmix_alpha") if getattr(finetuning_args, flag)]
    if mixing and training_args.per_device_train_batch_size == 1:
        raise UserError(
            f"{' and '.join(mixing)} mix each training image with another of its batch, and a batch of one image "
            "(--per_device_train_batch_size 1) has no other: nothing would be mixed. Give batches of 2 or more images."
        )
    return model_args, finetuning_args, data_args, training_args


def build_trainer(model_args, finetuning_args, data_args, training_args: TrainingArguments) -> tuple:
    """Everything up to training, in --output_dir (locked by the caller: the labelled subset is written there): the
    trainer and the image processor (the benchmarks time this trainer's steps)."""
    set_seed(training_args.seed)

    splits = load_splits(data_args, token=model_args.token)
    train, validation, image_column, label_column, names = labelled_splits(splits, data_args)
    train, indices = finetuning_args.select(train, label_column)
    if indices is not None and training_args.do_train and training_args.should_save:  # the images that train it
        save_labelled_subset(training_args.output_dir, finetuning_args.label_seed, indices)

    preset = choose_preset(data_args, splits["train"], image_column)
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    if finetuning_args.classifier_head is not None:
        labels["classifier_head"] = finetuning_args.classifier_head
    if model_args.model_name_or_path is not None:
        check_classes_fit(
            model_args.model_name_or_path, names, model_args.ignore_mismatched_sizes, **model_args.hub_kwargs
        )
    stage = {"task": "classification", "dataset": data_args.source} if training_args.do_train else None
    config = build_config(model_args, preset, **labels)
    image_processor = load_image_processor(model_args, preset, config)
    check_preset_applies(data_args.preset, model_args, config, image_processor)
    if finetuning_args.freeze_pretrained_batchnorm and config.backbone_norm != "batchnorm":
        raise UserError(
            f"--freeze_pretrained_batchnorm holds the patch network's BatchNorm statistics, but its backbone_norm is "
            f"{config.backbone_norm!r}, which keeps no statistics of the data: drop the flag."
        )
    model = build_model(SelfieForImageClassification, model_args, config)
    if finetuning_args.freeze_pretrained_batchnorm:
        freeze_batchnorm_statistics(model.selfie.patch_network)

    image_splits = ImageSplits(
        train,
        validation,
        image_column,
        image_processor,
        label_column=label_column,
        trivial_augment=finetuning_args.trivial_augment,
    )
    pipeline = image_pipeline(image_splits, data_args, training_args)
    trainer = ClassificationTrainer(
        model=model,
        args=training_args,
        **pipeline,
        compute_metrics=compute_accuracy,
        preprocess_logits_for_metrics=top_classes,
        max_unreadable_fraction=data_args.max_unreadable_fraction,
        pretrained_learning_rate=finetuning_args.pretrained_learning_rate,
        layer_decay=finetuning_args.layer_decay,
        freeze_pretrained_steps=finetuning_args.freeze_pretrained_steps,
        mixing=finetuning_args.mixing(training_args.label_smoothing_factor, len(names)),
        training_stages=training_stages(model_args, stage),
        card={
            "task": "classification",
            "dataset": data_args.source,
            "evaluation_split": data_args.evaluation_split,
            "model_name_or_path": model_args.model_name_or_path,  # the card's base_model, if a Hub id
            "dataset_description": f"{finetuning_args.describe()} of the training images of {data_args.source} "
            f"({_size(train)}, {len(names)} classes); evaluated on its validation split.",
        },
    )
    return trainer, image_processor


def freeze_batchnorm_statistics(module: nn.Module):
    """Every BatchNorm layer of `module` normalises with its running statistics, in training mode too, and leaves
    them as they are; its scale and shift still train. Trainer puts the model in training mode at every step, so
    each layer is put back in eval mode just before it runs."""
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.register_forward_pre_hook(_in_eval_mode)


def _in_eval_mode(norm: nn.Module, inputs: tuple):
    norm.eval()  # returns None, so the inputs pass unchanged


def check_classes_fit(checkpoint: str, names: list[str], ignore_mismatched_sizes: bool, **hub_kwargs):
    """A classifier checkpoint must classify the dataset's classes, by name and in their order, since its class ids
    are read as the dataset's. Of another number of classes, its classifier may start afresh
    (--ignore_mismatched_sizes); of as many, it would keep its weights, each class's read as another's."""
    config = load_selfie_config(checkpoint, "--model_name_or_path", **hub_kwargs)
    if saved_model_class(config) is not SelfieForImageClassification:
        return
    classes = [config.id2label[index] for index in sorted(config.id2label)]
    if classes == names or (len(classes) != len(names) and ignore_mismatched_sizes):
        return
    if len(classes) != len(names):
        raise UserError(
            f"--model_name_or_path {checkpoint} classifies {len(classes)} classes but the dataset has "
            f"{len(names)}: add --ignore_mismatched_sizes to start the classifier afresh."
        )
    unknown = [name for name in names if name not in classes]
    difference = f"{unknown[:5]} are not among its classes" if unknown else "the same classes in another order"
    raise UserError(
        f"--model_name_or_path {checkpoint} classifies {classes[:10]} but the dataset's classes are {names[:10]} "
        f"({difference}): its class ids would be read as other classes. Give a dataset of its classes; to train a "
        "classifier of these on its ResNet, export that with export_timm.py and start from it with --backbone_weights."
    )


def _size(dataset) -> str:
    return f"{len(dataset)} images" if hasattr(dataset, "__len__") else "streamed"
