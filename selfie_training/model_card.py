"""Model cards for the Selfie scripts: huggingface_hub's `ModelCard`, filled with transformers' training summary."""

import os
import re

from huggingface_hub import ModelCard, ModelCardData
from transformers.modelcard import extract_hyperparameters_from_trainer, make_markdown_table, parse_log_history

from .timm_weights import TIMM_WEIGHTS


CITATION = """@article{trinh2019selfie,
  title   = {Selfie: Self-supervised Pretraining for Image Embedding},
  author  = {Trinh, Trieu H. and Luong, Minh-Thang and Le, Quoc V.},
  journal = {arXiv preprint arXiv:1906.02940},
  year    = {2019}
}"""

# Sections that other scripts fill in after training (`set_section`), each between its two markers.
SECTIONS = {
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
summary = encoder(**inputs).pooler_output  # u: the attention-pooled summary of the image's patches""",
    "classification": """from transformers import pipeline

classify = pipeline("image-classification", model="{path}", trust_remote_code=True)
classify("image.png")""",
}

DESCRIPTIONS = {
    "pretraining": "A ResNet pretrained with Selfie (Trinh, Luong & Le, 2019) on unlabelled images: it learns to "
    "pick, for every hidden patch position, the right patch among an image's hidden patches, from an attention-pooled "
    "summary of the visible ones. Its patch network (the ResNet's first three stages) starts image classifiers: load "
    "it with `AutoModelForImageClassification`.",
    "classification": "An image classifier with a Selfie patch network (Trinh, Luong & Le, 2019): the first three "
    "stages of a ResNet, {origin}, then {head}, fine-tuned on labelled images.",
}


def write_model_card(trainer, *, task: str, dataset: str, dataset_description: str):
    """Write `README.md` into the trainer's output directory, with the results of the trainer's latest evaluation
    and the chain of training stages that the model's config records. `task` is "pretraining" or
    "classification"."""
    if not trainer.is_world_process_zero():
        return
    config = trainer.model.config
    output_dir = trainer.args.output_dir
    is_hub_dataset = "/" in dataset and not os.path.exists(dataset)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["selfie", "self-supervised", "image-classification" if task == "classification" else "pretraining"],
        datasets=[dataset] if is_hub_dataset else None,
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
        hyperparameters["num_masked_patches"] = config.num_masked_patches
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=os.path.basename(os.path.normpath(output_dir)),
        description=DESCRIPTIONS[task].format(origin=_origin(config), head=head),
        results=_results_table(trainer.state.log_history),
        dataset_description=dataset_description,
        stages=f"Oldest first, each stage starting from the weights of the one before (`training_stages` in "
        f"`config.json`):\n\n{describe_stages(config.training_stages, config.backbone)}",
        hyperparameters="\n".join(f"- {name}: {value}" for name, value in hyperparameters.items()),
        training_log=make_markdown_table(log_lines) if log_lines else "No evaluation during training.",
        usage=USAGE[task].format(path=trainer.args.hub_model_id or output_dir),
        citation=CITATION,
    )
    card.save(os.path.join(output_dir, "README.md"))


def describe_stages(stages: list[dict], backbone: str) -> str:
    """A chain of `SelfieConfig.training_stages`, e.g. "timm resnet50 weights from w.safetensors → Selfie pretraining
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
        return f"Selfie pretraining on {dataset}" + (" (norm layers only)" if stage.get("norm_only") else "")
    if task == "classification":
        return f"fine-tuning on {dataset}"
    # A kind of stage written by a later version: described by its fields.
    return f"{task} ({', '.join(f'{name}: {value}' for name, value in stage.items() if name != 'task')})"


def _origin(config) -> str:
    """Where a classifier's patch network came from: the stages before its first fine-tuning."""
    tasks = [stage["task"] for stage in config.training_stages]
    earlier = config.training_stages[: tasks.index("classification") if "classification" in tasks else len(tasks)]
    return f"pretrained ({describe_stages(earlier, config.backbone)})" if earlier else "trained from scratch"


def _results_table(log_history: list[dict]) -> str:
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if not evaluations:
        return "Not evaluated."
    latest = evaluations[-1]
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
