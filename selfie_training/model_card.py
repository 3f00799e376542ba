"""Model cards for the Selfie scripts: huggingface_hub's `ModelCard`, filled with transformers' training summary."""

import os
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.modelcard import extract_hyperparameters_from_trainer, make_markdown_table, parse_log_history

from modeling_selfie.configuration_selfie import is_number

from .checkpoints import TRAINING_STAGES_FILE
from .data import DIGITS
from .hub import is_hub_id
from .timm_weights import TIMM_WEIGHTS


CITATION = """@article{trinh2019selfie,
  title   = {Selfie: Self-supervised Pretraining for Image Embedding},
  author  = {Trinh, Trieu H. and Luong, Minh-Thang and Le, Quoc V.},
  journal = {arXiv preprint arXiv:1906.02940},
  year    = {2019}
}"""

# Sections filled in after the card is written (`set_section`), each between its two markers.
SECTIONS = {
    "pretext_task": "The pretext task, as the model does it",  # run_pretraining.py, at the end of training
    "comparison": "Pretraining against training from scratch",  # run_sweep.py
    "frozen_features": "Frozen-feature evaluation",  # run_evaluation.py
}

TEMPLATE = (
    """---
{{ card_data }}
---

# {{ model_name }}

{{ description }}

## Results

{{ results }}

"""
    + "\n".join(f"<!-- {name} -->\n<!-- /{name} -->\n" for name in SECTIONS)
    + """
## Training data

{{ dataset_description }}

## Training procedure

### Stages

{{ stages }}

### Hyperparameters

{{ hyperparameters }}

### Training log

{{ training_log }}

## How to use

The model code is saved with the weights, so `trust_remote_code=True` loads it without this repository (or
`import modeling_selfie` first, where it is installed).

```python
{{ usage }}
```

## Citation

```bibtex
{{ citation }}
```
"""
)

USAGE = {
    "pretraining": """from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{path}")
encoder = AutoModel.from_pretrained("{path}", trust_remote_code=True)
inputs = processor(images, return_tensors="pt")
summary = encoder(**inputs).pooler_output  # the summary vector: the attention-pooled summary of the image's patches""",
    "classification": """from transformers import pipeline

classify = pipeline("image-classification", model="{path}", trust_remote_code=True)
classify("image.png")  # 16-bit or float images: classify(modeling_selfie.to_rgb(image)), read as in training""",
}

# The Hub's results (`model-index` in the card's YAML header): the task of each kind of figure, and a readable name
# for each metric. A metric's type is its name in all_results.json (eval_results.json for run_evaluation.py) without
# "eval_", so that the header and the JSON files name the same figure alike; the types differ between protocols
# (fine-tuned "accuracy" against frozen-feature "knn_top1"), as the Hub groups the results of a task and dataset.
TASKS = {
    "pretraining": {"task_type": "image-feature-extraction", "task_name": "Selfie patch selection"},
    "classification": {"task_type": "image-classification", "task_name": "Image classification"},
}
METRIC_NAMES = {
    "loss": "Loss",
    "candidate_accuracy": "Candidate accuracy (the right patch picked for a hidden position)",
    "accuracy": "Top-1 accuracy",
    "top5_accuracy": "Top-5 accuracy",
    "knn_top1": "k-NN top-1 accuracy (frozen features)",
    "knn_top5": "k-NN top-5 accuracy (frozen features)",
    "linear_probe_top1": "Linear-probe top-1 accuracy (frozen features)",
    "linear_probe_top5": "Linear-probe top-5 accuracy (frozen features)",
}
FROZEN_FEATURE_METRICS = ("knn_top1", "knn_top5", "linear_probe_top1", "linear_probe_top5")  # run_evaluation.py's

DESCRIPTIONS = {
    "pretraining": "A ResNet pretrained with Selfie (Trinh, Luong & Le, 2019) on unlabelled images: it learns to "
    "pick, for every hidden patch position, the right patch among an image's hidden patches, from an attention-pooled "
    "summary of the visible ones. Its patch network (the ResNet's first three stages) starts image classifiers: load "
    "it with `AutoModelForImageClassification`.",
    "classification": "An image classifier with a Selfie patch network (Trinh, Luong & Le, 2019): the first three "
    "stages of a ResNet, {origin}, then {head}, fine-tuned on labelled images.",
}


def write_model_card(
    trainer,
    *,
    task: str,
    dataset: str,
    dataset_description: str,
    evaluation_split: str = "validation",
    model_name_or_path: str | None = None,
    stages: list[dict],
):
    """Write `README.md` into the trainer's output directory, with the results of the trainer's latest evaluation
    (in the Markdown and in the YAML header's `model-index`) and `stages`, the chain of training stages that the
    weights went through. `task` is "pretraining" or "classification"; `model_name_or_path` the checkpoint the run started from
    (--model_name_or_path), the card's `base_model` where it is a Hub model and the run trained."""
    if not trainer.is_world_process_zero():
        return
    config = trainer.model.config
    output_dir = trainer.args.output_dir
    model_name = os.path.basename(os.path.normpath(output_dir))
    latest = _latest_evaluation(trainer.state.log_history)
    trained = trainer.args.do_train
    # Without training the weights are --model_name_or_path's own: the checkpoint is not a base, nor the data theirs.
    base_model = hub_model_id(model_name_or_path) if trained else None
    results = evaluation_results(latest, task, dataset, evaluation_split)
    card_data = ModelCardData(
        model_name=model_name if results else None,  # the name of the `model-index`, only written with it
        eval_results=results or None,
        datasets=[hub_dataset_id(dataset)] if trained and hub_dataset_id(dataset) else None,
        # The Hub's metric ids: a classifier's accuracy; the pretraining figures (loss, candidate accuracy) are none.
        metrics=["accuracy"] if results and task == "classification" else None,
        base_model=base_model,
        library_name="transformers",
        license="apache-2.0",
        tags=["selfie", "self-supervised", "image-classification" if task == "classification" else "pretraining"],
        pipeline_tag="image-classification" if task == "classification" else "image-feature-extraction",
    )
    head = (
        "stage 4, average pooling and a linear classifier"
        if config.classifier_head == "resnet"
        else ("the attention pooling network and a linear classifier")
    )
    _, log_lines, _ = parse_log_history(trainer.state.log_history)
    hyperparameters = extract_hyperparameters_from_trainer(trainer)
    hyperparameters.update(backbone=config.backbone, image_size=config.image_size, patch_size=config.patch_size)
    if task == "pretraining":
        hyperparameters.update(
            masking_strategy=config.masking_strategy,
            num_masked_patches=config.num_masked_patches,
            query_type=config.query_type,
        )
        if config.image_contrastive_weight > 0:
            hyperparameters.update(
                image_contrastive_weight=config.image_contrastive_weight,
                contrastive_temperature=config.contrastive_temperature,
            )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        description=DESCRIPTIONS[task].format(origin=_origin(stages, config.backbone), head=head),
        results=_results_table(latest),
        dataset_description=dataset_description,
        stages=f"Oldest first, each stage starting from the weights of the one before (`{TRAINING_STAGES_FILE}`):"
        f"\n\n{describe_stages(stages, config.backbone)}"
        + (_describe_start(model_name_or_path, base_model) if trained and model_name_or_path else ""),
        hyperparameters="\n".join(f"- {name}: {value}" for name, value in hyperparameters.items()),
        training_log=make_markdown_table(log_lines) if log_lines else "No evaluation during training.",
        usage=USAGE[task].format(path=trainer.args.hub_model_id or output_dir),
        citation=CITATION,
    )
    card.save(os.path.join(output_dir, "README.md"))


def hub_dataset_id(dataset: str | None) -> str | None:
    """`dataset` as the card's `datasets` lists it: a Hub id (`is_hub_id`), or None for a local folder and for the
    embedded digits ("sklearn-digits", which no Hub repository holds)."""
    return dataset if dataset != DIGITS and is_hub_id(dataset) else None


def hub_model_id(model_name_or_path: str | None) -> str | None:
    """The card's `base_model` for a run that started from `model_name_or_path`: the Hub id, or None for fresh
    weights and for a local checkpoint (the Hub's `base_model` must name a Hub model; the card's stages name the
    local one)."""
    return model_name_or_path if is_hub_id(model_name_or_path) else None


def _describe_start(model_name_or_path: str, base_model: str | None) -> str:
    if base_model is not None:
        return f"\n\nThis run started from the Hub model [{base_model}](https://huggingface.co/{base_model})."
    return (
        f"\n\nThis run started from the local checkpoint `{model_name_or_path}`; not being a Hub model, it is not the "
        "card's `base_model`."
    )


def evaluation_results(metrics: dict | None, task: str, dataset: str, split: str) -> list[EvalResult]:
    """The Hub's results (`model-index`) of an evaluation's `metrics` (a log entry or all_results.json: "eval_"
    names, runtimes and speeds left out, as in the card's Markdown table) on the validation split of `dataset`.
    Non-finite figures are left out: YAML would write NaN as `.nan`, which the Hub's results do not take."""
    return [
        _eval_result(TASKS[task], dataset, split, name.removeprefix("eval_"), value)
        for name, value in (metrics or {}).items()
        if _is_result(name) and is_number(value)
    ]


def frozen_feature_results(
    results: dict, dataset: str, split: str, metric_args: dict[str, dict] | None = None
) -> list[EvalResult]:
    """The Hub's results of run_evaluation.py's `results` (k-NN and linear-probe top-1 and top-5 accuracy, those it
    ran) on the validation split of `dataset`; `metric_args` holds each protocol's settings ("knn", "linear_probe")."""
    return [
        _eval_result(
            TASKS["classification"],
            dataset,
            split,
            name,
            results[name],
            (metric_args or {}).get(name.rsplit("_", 1)[0]),
        )
        for name in FROZEN_FEATURE_METRICS
        if is_number(results.get(name))
    ]


def _eval_result(
    task: dict, dataset: str, split: str, metric: str, value: float, metric_args: dict | None = None
) -> EvalResult:
    dataset_type, dataset_name = results_dataset(dataset)
    return EvalResult(
        **task,
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=split,
        metric_type=metric,
        metric_name=METRIC_NAMES.get(metric, metric),
        metric_value=value,
        metric_args=metric_args or None,
    )


def results_dataset(dataset: str) -> tuple[str, str]:
    """The `dataset.type` and `dataset.name` of the card's results on `dataset`: a Hub id, or the embedded digits, as
    it is; local data by its folder's (or file's) name, said to be local: its path is of the machine that ran, which
    a card meant for the Hub should not carry."""
    if dataset == DIGITS or is_hub_id(dataset):
        return dataset, dataset
    name = os.path.basename(os.path.normpath(dataset))
    return name, f"{name} (local data)"


def set_frozen_feature_results(card_path: str, results: list[EvalResult]):
    """Put `results` (`frozen_feature_results`) into the `model-index` of the card at `card_path`, in place of the
    frozen-feature results there (whatever their dataset: like the card's section, they hold the latest evaluation);
    the card's other results stay."""
    card = ModelCard.load(card_path)
    kept = [result for result in card.data.eval_results or [] if result.metric_type not in FROZEN_FEATURE_METRICS]
    card.data.eval_results = kept + results or None
    if card.data.eval_results:  # `model_name` names the `model-index`; without one it would be a key of its own
        card.data.model_name = card.data.model_name or os.path.basename(os.path.dirname(os.path.abspath(card_path)))
        card.data.metrics = sorted({*(card.data.metrics or []), "accuracy"})
    else:
        card.data.model_name = None
    card.save(card_path)


def describe_stages(stages: list[dict], backbone: str) -> str:
    """A chain of training stages (`checkpoints.load_training_stages`), e.g. "timm resnet50 weights from w.safetensors → Selfie pretraining
    on X (norm layers only) → fine-tuning on Y"; a chain that does not start from timm weights starts fresh."""
    start = [] if stages and stages[0]["task"] == "timm_weights" else ["fresh weights"]
    return " → ".join(start + [_describe_stage(stage, backbone) for stage in stages])


def _describe_stage(stage: dict, backbone: str) -> str:
    task, dataset = stage["task"], stage.get("dataset", "unnamed data")
    if task == "timm_weights":
        if stage.get("weights") == TIMM_WEIGHTS:
            return f"timm's pretrained {backbone} weights"
        return f"timm {backbone} weights from {stage.get('weights', 'an unnamed file')}"
    if task == "pretraining":
        notes = [stage["objective"]] if stage.get("objective") else []
        notes += ["norm layers only"] if stage.get("norm_only") else []
        if stage.get("batchnorm_recalibration_samples"):
            notes += [
                f"BatchNorm statistics re-estimated on {stage['batchnorm_recalibration_samples']:,} whole images"
            ]
        return f"Selfie pretraining on {dataset}" + (f" ({'; '.join(notes)})" if notes else "")
    if task == "classification":
        return f"fine-tuning on {dataset}"
    # A kind of stage written by a later version: described by its fields.
    return f"{task} ({', '.join(f'{name}: {value}' for name, value in stage.items() if name != 'task')})"


def describe_objective(config) -> str:
    """The pretraining objective that `config` sets, in a few words (recorded in the pretraining stage, so that every
    later card names it too)."""
    hidden, total = config.num_masked_patches, config.num_patches
    if config.masking_strategy == "split":
        objective = f"SplitMask split-and-match, halves of {total - hidden} and {hidden} patches filling in each other"
    else:
        objective = f"Selfie patch selection, {hidden} of {total} patches hidden at random"
    if config.query_type == "mlp":
        objective += ", queries through an MLP"
    if config.image_contrastive_weight > 0:
        objective += f", plus {config.image_contrastive_weight} x image-level InfoNCE"
    return objective


def _origin(stages: list[dict], backbone: str) -> str:
    """Where a classifier's patch network came from: the stages before its first fine-tuning."""
    tasks = [stage["task"] for stage in stages]
    earlier = stages[: tasks.index("classification") if "classification" in tasks else len(tasks)]
    return f"pretrained ({describe_stages(earlier, backbone)})" if earlier else "trained from scratch"


def _latest_evaluation(log_history: list[dict]) -> dict | None:
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    return evaluations[-1] if evaluations else None


def _results_table(latest: dict | None) -> str:
    if latest is None:
        return "Not evaluated."
    rows = [f"| {name.removeprefix('eval_')} | {value:.4f} |" for name, value in latest.items() if _is_result(name)]
    return "\n".join(
        [f"On the validation split, after {latest['step']} steps:", "", "| metric | value |", "|---|---|", *rows]
    )


def _is_result(name: str) -> bool:
    return name.startswith("eval_") and not name.endswith(("_runtime", "_per_second"))


def set_section(card_path: str, name: str, markdown: str):
    """Put `markdown` into the card's section `name` (one of `SECTIONS`), replacing what was there. A card written
    before the section existed gets it before "## Training data" (at the end if it has no such heading)."""
    card = ModelCard.load(card_path)
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    section = f"{start}\n## {SECTIONS[name]}\n\n{markdown}\n{end}"
    if start not in card.text:
        heading = "## Training data"
        card.text = (
            card.text.replace(heading, f"{start}\n{end}\n\n{heading}", 1)
            if heading in card.text
            else (f"{card.text.rstrip()}\n\n{start}\n{end}\n")
        )
    pattern = re.escape(start) + ".*?" + re.escape(end)
    card.text = re.sub(pattern, lambda _: section, card.text, flags=re.DOTALL)
    card.save(card_path)
