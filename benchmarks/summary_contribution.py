#!/usr/bin/env python
"""How much of a pretraining checkpoint's candidate accuracy comes from the summary u of the visible patches: the
validation candidate accuracy with u as it is, with u set to zero, and with the u of another image of the batch.

    python -m benchmarks.summary_contribution CHECKPOINT --dataset_name ../shared/data/cifar10

With the paper's queries (u + pos_i) the score of a candidate patch moves with u by the same amount at every hidden
position, so u cannot say which patch goes where, and the three figures stay close; with queries through an MLP
(`query_type="mlp"`) u and the position interact, and another image's u should cost accuracy. The validation split
is the training scripts' (--max_eval_samples 2000 held out with --split_seed 0), under the evaluation transform, with
masks drawn from seed 0 and BatchNorm on its running statistics. Used for docs/research-log.md.
"""

import argparse

from benchmarks.candidate_accuracy_by_transform import candidate_accuracy, load_checkpoint, masked_images
from selfie_training.data import image_transform
from selfie_training.runner import int_at_least, run


SUMMARIES = {
    "as it is": lambda summary: summary,
    "set to zero": lambda summary: summary * 0,
    "of another image": lambda summary: summary.roll(1, dims=0),
}


def swapping_the_summary(change):
    """A forward pre-hook for `SelfieQueries`, whose inputs are (summary, position embeddings): `change`s the summary."""
    return lambda module, inputs: (change(inputs[0]), *inputs[1:])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--samples", type=int_at_least(1), default=2000)
    parser.add_argument(
        "--max_eval_samples", type=int_at_least(1), default=2000, help="The validation split's size, as trained."
    )
    args = parser.parse_args(argv)
    model, processor, splits = load_checkpoint(args.checkpoint, args.dataset_name, args.max_eval_samples)
    images = splits["validation"].select(range(min(args.samples, len(splits["validation"]))))
    transform = image_transform(processor, train=False)
    accuracies = {}
    for name, change in SUMMARIES.items():
        hook = model.queries.register_forward_pre_hook(swapping_the_summary(change))
        accuracy = candidate_accuracy(model, masked_images(images, transform, model.config), batch_norm_on_batch=False)
        hook.remove()
        accuracies[name] = accuracy
        print(f"summary {name}: validation candidate accuracy {accuracy:.3f}", flush=True)
    return accuracies


if __name__ == "__main__":
    run(main)
