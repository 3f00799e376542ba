"""Accuracy through `evaluate`, offline: `evaluate.load("accuracy")` fetches its script from the Hub at run time,
so the metric is defined here as an `evaluate.Metric` and needs no network."""

import datasets
import evaluate
import numpy as np
import torch

from modeling_selfie import candidate_hits


class TopKAccuracy(evaluate.Metric):
    """Accuracy, and top-k accuracy, from the k highest-scored classes of every example (best first)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share of examples whose highest-scored class (or one of the k highest) is the label.",
            citation="",
            inputs_description="predictions: the k highest-scored class ids of each example, best first; "
            "references: the label of each example.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        hits = np.asarray(predictions) == np.asarray(references)[:, None]
        result = {"accuracy": float(hits[:, 0].mean())}
        if hits.shape[1] > 1:
            result[f"top{hits.shape[1]}_accuracy"] = float(hits.any(axis=1).mean())
        return result


def top_classes(logits: torch.Tensor, labels) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for classifiers: keep the 5 best classes (1 where there are 5 or fewer), so
    that evaluation gathers 5 ids an image instead of every logit."""
    k = 5 if logits.shape[-1] > 5 else 1
    return logits.topk(k, dim=-1).indices


def compute_accuracy(eval_prediction) -> dict:
    metric = TopKAccuracy(keep_in_memory=True)
    return metric.compute(predictions=eval_prediction.predictions, references=eval_prediction.label_ids)


def image_candidate_hits(outputs, labels) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for pretraining: each image's candidate accuracy (`candidate_hits`) over the
    logits of every direction (`logits`, and `reverse_logits` with the split objective: all that `Trainer` keeps of
    the outputs, as the config's `keys_to_ignore_at_inference` says), so that evaluation gathers one number per image
    instead of its logits."""
    return candidate_hits(*(outputs if isinstance(outputs, tuple) else (outputs,)))


def compute_candidate_accuracy(eval_prediction) -> dict:
    return {"candidate_accuracy": float(np.mean(eval_prediction.predictions))}
