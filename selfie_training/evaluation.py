"""Frozen-feature evaluation of a Selfie patch network: k-NN and linear-probe accuracy, and a callback that logs the
k-NN accuracy while pretraining.

The features of an image are P's stage-3 feature map of the whole image (P runs on the full image, not on its
patches, as it does when it starts a classifier), global-average-pooled: one vector of P's width (1024 for
ResNet-50) an image. Nothing is trained on the encoder; its BatchNorm layers run in eval mode, on the statistics
saved with it or, after `recalibrate_batchnorm`, on those of the evaluation's whole images.
"""

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import EvalPrediction, TrainerCallback

from .data import (
    collate_images,
    find_label_column,
    image_transform,
    labelled_splits,
    limit_samples,
    with_image_transform,
)
from .errors import UserError
from .metrics import compute_accuracy, top_classes


logger = logging.getLogger(__name__)

# The k-NN scores at most this many (query, training image) pairs at once: queries are taken in chunks of
# KNN_CHUNK_ELEMENTS // (training images), so the similarity matrix stays near 256 MB whatever the dataset's size.
KNN_CHUNK_ELEMENTS = 2**26


@dataclass
class KNNArguments:
    knn_k: int = field(default=200, metadata={"help": "k-NN: the number of nearest training images that vote."})
    knn_temperature: float = field(
        default=0.07, metadata={"help": "k-NN: every neighbour's vote is exp(cosine similarity / this)."}
    )

    def __post_init__(self):
        if self.knn_k < 1:
            raise UserError(f"--knn_k {self.knn_k} must be at least 1.")
        if not self.knn_temperature > 0:
            raise UserError(f"--knn_temperature {self.knn_temperature} must be positive.")


@dataclass
class LabelledFeatures:
    """One feature vector (a row of `features`) and one label an image."""

    features: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "LabelledFeatures":
        return LabelledFeatures(self.features.to(device), self.labels.to(device))


def labelled_images(dataset, image_processor, image_column: str, label_column: str):
    """The dataset as `extract_features` reads it: evaluation transform (resize, centre crop, normalise), labels."""
    return with_image_transform(dataset, image_transform(image_processor, train=False), image_column, label_column)


@contextmanager
def _in_mode(model, training: bool):
    """`model` in training or eval mode within the block, and in the mode it had before after it."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _image_batches(model, dataset, batch_size: int, num_workers: int):
    """The batches of `dataset` (from `labelled_images`), their pixel values on the model's device and in its dtype
    (empty where none of a batch's images could be read)."""
    parameter = next(model.parameters())
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_images, num_workers=num_workers):
        batch["pixel_values"] = batch["pixel_values"].to(parameter.device, parameter.dtype)
        yield batch


@torch.no_grad()
def recalibrate_batchnorm(model, dataset, batch_size: int = 256, num_workers: int = 0) -> int:
    """Re-estimate the running statistics of P's BatchNorm layers on the whole images of `dataset` (from
    `labelled_images`; labels unread): each layer's plain average over every batch. A pretraining checkpoint's
    statistics were gathered on patches, and whole images, which the frozen-feature evaluation reads, are another
    input. The model's mode is restored after. Returns the number of layers re-estimated (0 for a per-sample norm)."""
    encoder = getattr(model, "selfie", model)
    norms = [module for module in encoder.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    try:
        with _in_mode(model, training=True):
            for batch in _image_batches(model, dataset, batch_size, num_workers):
                if len(batch["pixel_values"]):
                    encoder.feature_map(batch["pixel_values"])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return len(norms)


class BatchNormRecalibration(TrainerCallback):
    """When training has run to its last step, `recalibrate_batchnorm` on `images` (whole images under the evaluation
    transform, from `with_image_transform`; labels unread), so that the model the Trainer saves next carries the
    statistics of the whole images that a classifier or a frozen-feature user feeds P, not those of the patches P was
    pretrained on. Checkpoints saved during training keep the patches' statistics, so a resumed run trains on as
    before. Every process re-estimates the same statistics from the same images: no collective operation."""

    def __init__(self, images, batch_size: int, num_workers: int):
        self.images, self.batch_size, self.num_workers = images, batch_size, num_workers

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step < state.max_steps:  # stopped early: the run resumes, and ends here, later
            return
        layers = recalibrate_batchnorm(model, self.images, self.batch_size, self.num_workers)
        logger.info("Re-estimated the statistics of %d BatchNorm layers on whole training images.", layers)


@torch.no_grad()
def extract_features(model, dataset, batch_size: int = 256, num_workers: int = 0) -> LabelledFeatures:
    """The pooled stage-3 features (on the CPU, float32) and labels of every readable image of `dataset` (from
    `labelled_images`), read batch by batch with the model in eval mode; the model's mode is restored after.
    `model` is any Selfie model: a `SelfieModel`, or a model holding one as `.selfie`."""
    encoder = getattr(model, "selfie", model)
    features, labels, unreadable = [], [], 0
    with _in_mode(model, training=False):
        for batch in _image_batches(model, dataset, batch_size, num_workers):
            unreadable += len(batch["unreadable_images"])
            if len(batch["pixel_values"]) == 0:  # no image of the batch could be read
                continue
            features.append(encoder.feature_map(batch["pixel_values"]).mean(dim=(2, 3)).float().cpu())
            labels.append(batch["labels"])
    if unreadable:
        logger.warning("Skipped %d unreadable images in feature extraction.", unreadable)
    if not features:
        raise UserError(f"None of the {unreadable} images could be read, so there are no features to evaluate.")
    return LabelledFeatures(torch.cat(features), torch.cat(labels))


def knn_accuracy(
    train: LabelledFeatures,
    test: LabelledFeatures,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int | None = None,
) -> dict:
    """Weighted k-NN classification as in instance discrimination (Wu et al., 2018): the cosine similarity of
    L2-normalised features, the `k` most similar training images, each voting for its class with weight
    exp(similarity / temperature). Returns `knn_top1` (and `knn_top5` above 5 classes), shares in [0, 1]. The test
    images go `chunk_size` at a time (default: as many as `KNN_CHUNK_ELEMENTS` allows)."""
    bank = F.normalize(train.features, dim=1)
    k = min(k, len(bank))
    chunk_size = chunk_size or max(1, KNN_CHUNK_ELEMENTS // len(bank))
    votes = []
    for queries in F.normalize(test.features, dim=1).split(chunk_size):
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes.append(weights.new_zeros(len(queries), num_classes).scatter_add_(1, train.labels[neighbours], weights))
    return _accuracies("knn", torch.cat(votes), test.labels)


def linear_probe_accuracy(
    train: LabelledFeatures,
    test: LabelledFeatures,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iterations: int = 1000,
) -> dict:
    """A linear classifier on the frozen features: multinomial logistic regression on features standardised with
    the training images' mean and std, minimising the mean cross-entropy + weight_decay / 2 * |W|^2 (the bias not
    penalised) by full-batch L-BFGS from zero weights. Returns `linear_probe_top1` (and `_top5` above 5 classes).

    Why this solver: the problem is convex, so L-BFGS on the whole batch finds its one optimum in a few hundred
    iterations (seconds for tens of thousands of images) with no learning rate, schedule or epoch count to tune, and
    the answer depends on nothing random (the same inputs give the same probe). It runs on the features' device in
    torch, without the float64 copy scikit-learn's solvers make. `weight_decay` is scikit-learn's 1 / (C * n)."""
    mean, std = train.features.mean(dim=0), train.features.std(dim=0).clamp_min(1e-6)
    inputs, test_inputs = (train.features - mean) / std, (test.features - mean) / std
    weight = train.features.new_zeros(num_classes, inputs.shape[1], requires_grad=True)
    bias = train.features.new_zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iterations,
        tolerance_grad=1e-6,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight.T + bias, train.labels) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return _accuracies("linear_probe", test_inputs @ weight.T + bias, test.labels)


def _accuracies(prefix: str, scores: torch.Tensor, labels: torch.Tensor) -> dict:
    # The fine-tuning metric itself: top-1, and top-5 above 5 classes.
    predictions = EvalPrediction(predictions=top_classes(scores, labels).cpu().numpy(), label_ids=labels.cpu().numpy())
    accuracy = compute_accuracy(predictions)
    result = {f"{prefix}_top1": accuracy["accuracy"]}
    if "top5_accuracy" in accuracy:
        result[f"{prefix}_top5"] = accuracy["top5_accuracy"]
    return result


class KNNMonitor(TrainerCallback):
    """At every evaluation of a `Trainer` (as `--eval_strategy` says, and the final `evaluate()`), extract the
    features of a labelled training subset (the memory bank) and of the validation images, and log their k-NN
    accuracy (`knn_top1`, and `knn_top5` above 5 classes) through `trainer.log`: it lands in `log_history`, the
    console and the reporting integrations (tensorboard files it under `train/`, as it does every key not
    starting with `eval_`), so one sees whether the representation improves while the pretraining loss falls.

    The work is done on the main process alone, with the unwrapped model, so that the figure is logged once; the
    other processes wait for it at the end of the evaluation, so that none runs ahead of the main process into the
    next step, or out of the run and its process group, while it still works. It needs the whole model on the main
    process: not with FSDP or DeepSpeed ZeRO-3.
    """

    def __init__(self, trainer, memory_bank, validation, num_classes: int, k: int = 200, temperature: float = 0.07):
        self.trainer = trainer
        self.memory_bank, self.validation = memory_bank, validation
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._log_knn_accuracy(args, model)
        self.trainer.accelerator.wait_for_everyone()

    def _log_knn_accuracy(self, args, model):
        extract = dict(batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers)
        train = extract_features(model, self.memory_bank, **extract)
        test = extract_features(model, self.validation, **extract)
        device = next(model.parameters()).device
        self.trainer.log(
            knn_accuracy(train.to(device), test.to(device), self.num_classes, k=self.k, temperature=self.temperature)
        )


@dataclass
class KNNMonitorArguments(KNNArguments):
    knn_monitor_samples: int | None = field(
        default=None,
        metadata={
            "help": "At every evaluation, log the k-NN accuracy (knn_top1) of the validation images against this "
            "many labelled training images, to see the representation improve. Needs a label column. Default: off."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.knn_monitor_samples is not None and self.knn_monitor_samples < 1:
            raise UserError(f"--knn_monitor_samples {self.knn_monitor_samples} must be at least 1.")


def build_knn_monitor(trainer, splits: dict, data_args, image_processor, args: KNNMonitorArguments):
    """The `KNNMonitor` that `--knn_monitor_samples` asks for: a memory bank of that many training images (drawn with
    --split_seed), the validation split as test."""
    if find_label_column(splits["train"], data_args.label_column_name, required=False) is None:
        raise UserError(
            f"--knn_monitor_samples {args.knn_monitor_samples} needs labels, but the dataset has no label column "
            "(name it with --label_column_name, or drop --knn_monitor_samples)."
        )
    train, validation, image_column, label_column, names = labelled_splits(splits, data_args)
    memory_bank = limit_samples(train, args.knn_monitor_samples, data_args.split_seed)
    return KNNMonitor(
        trainer,
        labelled_images(memory_bank, image_processor, image_column, label_column),
        labelled_images(validation, image_processor, image_column, label_column),
        num_classes=len(names),
        k=args.knn_k,
        temperature=args.knn_temperature,
    )
