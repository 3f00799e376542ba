"""The model cards' YAML header, where the Hub reads results (`model-index`), datasets, metrics and `base_model`:
loaded back with huggingface_hub and checked against the runs' all_results.json and eval_results.json."""

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import TrainingArguments

from modeling_selfie import SelfieConfig, SelfieForImageClassification, SelfieForMaskedPatchPrediction
from selfie_training import classification, pretraining
from selfie_training import feature_evaluation as run_evaluation
from selfie_training.data import RandomStream
from selfie_training.errors import UserError
from selfie_training.model_card import (
    describe_objective,
    hub_dataset_id,
    hub_model_id,
    is_hub_id,
    set_frozen_feature_results,
    write_model_card,
)
from selfie_training.trainer import SelfieTrainer
from tests.utils import QUIET_FLAGS, fine_tune, pretrain, tiny_config


SMALL_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "32",
             "--max_eval_samples", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny pretraining on the embedded digits."""
    output = tmp_path_factory.mktemp("runs") / "selfie-digits"
    pretrain(output, *SMALL_RUN)
    return output


@pytest.fixture(scope="module")
def fine_tuned(pretrained) -> Path:
    """A tiny fine-tuning on the digits, started from the local checkpoint `pretrained`."""
    output = pretrained.parent / "classifier"
    fine_tune(output, "--model_name_or_path", str(pretrained), *SMALL_RUN)
    return output


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def results_by_metric(card: ModelCard) -> dict[str, EvalResult]:
    results = {result.metric_type: result for result in card.data.eval_results or []}
    assert len(results) == len(card.data.eval_results or []), "one result a metric"
    return results


def evaluated_metrics(folder: Path) -> dict[str, float]:
    """all_results.json's evaluation figures, as the card's Markdown table shows them."""
    figures = json.loads((folder / "all_results.json").read_text())
    return {
        name.removeprefix("eval_"): value
        for name, value in figures.items()
        if name.startswith("eval_") and not name.endswith(("_runtime", "_per_second"))
    }


def test_pretraining_card_holds_its_results_in_the_model_index(pretrained):
    card = card_of(pretrained)
    results = results_by_metric(card)
    expected = evaluated_metrics(pretrained)
    assert set(expected) == {"loss", "candidate_accuracy"}
    assert {name: result.metric_value for name, result in results.items()} == expected
    for result in results.values():
        assert (result.task_type, result.task_name) == ("image-feature-extraction", "Selfie patch selection")
        assert (result.dataset_type, result.dataset_name, result.dataset_split) == (
            "sklearn-digits",
            "sklearn-digits",
            "train",  # the digits have no validation split: it is held out from train
        )
    assert results["candidate_accuracy"].metric_name.startswith("Candidate accuracy")
    assert card.data.model_name == "selfie-digits"
    assert card.data.metrics is None  # the loss and the candidate accuracy are no metric of the Hub's
    assert card.data.datasets is None  # the embedded digits are no Hub dataset
    assert card.data.base_model is None  # fresh weights
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    header = (pretrained / "README.md").read_text().split("---")[1]
    assert "model-index:" in header and "model_name" not in header


def test_fine_tuned_card_holds_its_accuracy_and_names_no_local_base_model(fine_tuned, pretrained):
    card = card_of(fine_tuned)
    results = results_by_metric(card)
    expected = evaluated_metrics(fine_tuned)
    assert set(expected) == {"loss", "accuracy", "top5_accuracy"}  # 10 classes: top-5 reported
    assert {name: result.metric_value for name, result in results.items()} == expected
    assert {(result.task_type, result.dataset_type, result.dataset_split) for result in results.values()} == {
        ("image-classification", "sklearn-digits", "train")
    }
    assert results["accuracy"].metric_name == "Top-1 accuracy"
    assert card.data.datasets is None and card.data.metrics == ["accuracy"]
    # It started from a local checkpoint, which the Hub's base_model cannot name; the Markdown says so.
    assert card.data.base_model is None
    assert f"started from the local checkpoint `{pretrained}`" in card.text
    assert "fresh weights → Selfie pretraining on sklearn-digits → fine-tuning on sklearn-digits" in card.text


def test_run_evaluation_adds_its_figures_to_the_model_index(tmp_path, pretrained):
    checkpoint = tmp_path / "selfie-digits"
    shutil.copytree(pretrained, checkpoint)
    before = results_by_metric(card_of(checkpoint))

    def evaluate(output: str, *flags: str) -> dict:
        arguments = ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / output),
                     "--max_train_samples", "100", "--max_eval_samples", "50", *QUIET_FLAGS, *flags]  # fmt: skip
        run_evaluation.main(arguments)
        return json.loads((tmp_path / output / "eval_results.json").read_text())

    first = evaluate("first", "--knn_k", "10")
    results = results_by_metric(card_of(checkpoint))
    frozen = {"knn_top1", "knn_top5", "linear_probe_top1", "linear_probe_top5"}
    assert set(results) == set(before) | frozen
    assert {name: results[name].metric_value for name in frozen} == {name: first[name] for name in frozen}
    for name in before:  # the pretraining's own results stay as they were
        assert results[name] == before[name]
    for name in frozen:
        result = results[name]
        assert (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split) == (
            "image-classification",
            "sklearn-digits",
            "sklearn-digits",
            "train",  # the digits have no validation split: it is held out from train
        )
    assert results["knn_top1"].metric_args == {"k": 10, "temperature": 0.07}
    assert results["linear_probe_top5"].metric_args == {"weight_decay": 1e-4}
    assert results["linear_probe_top1"].metric_name == "Linear-probe top-1 accuracy (frozen features)"

    # A second evaluation replaces the first's figures, as it replaces the card's section: only k-NN now.
    second = evaluate("second", "--protocols", "knn")
    card = card_of(checkpoint)
    results = results_by_metric(card)
    assert set(results) == set(before) | {"knn_top1", "knn_top5"}
    assert (results["knn_top1"].metric_value, results["knn_top5"].metric_value) == (
        second["knn_top1"],
        second["knn_top5"],
    )
    assert second["knn_k"] == 100  # the default 200, but only 100 training images can vote
    assert results["knn_top1"].metric_args == {"k": 100, "temperature": 0.07}
    assert "k-NN (k=100, temperature 0.07)" in card.text
    assert card.data.model_name == "selfie-digits" and card.data.metrics == ["accuracy"]
    assert card.text.count("## Frozen-feature evaluation") == 1


def test_frozen_feature_results_go_into_a_card_without_a_model_index(tmp_path):
    path = tmp_path / "old-run" / "README.md"
    path.parent.mkdir()
    ModelCard.from_template(ModelCardData(library_name="transformers", metrics=["f1"]), template_str="---\n{{ card_data }}\n---\n\nText.\n").save(path)  # fmt: skip
    result = EvalResult(
        task_type="image-classification",
        dataset_type="uoft-cs/cifar10",
        dataset_name="uoft-cs/cifar10",
        metric_type="knn_top1",
        metric_value=0.5,
    )
    set_frozen_feature_results(str(path), [result])
    card = ModelCard.load(path)
    assert card.data.eval_results == [result] and card.data.model_name == "old-run"
    assert card.data.metrics == ["accuracy", "f1"] and card.text.strip() == "Text."


def test_hub_ids_are_ids_that_name_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "selfie-cifar10").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for name in ("uoft-cs/cifar10", "cifar10", "someone/selfie-resnet50.v2"):
        assert is_hub_id(name), name
    for name in (None, "", "outputs/selfie-cifar10", "images", str(tmp_path / "images"), "./data", "a/b/c",
                 "bad--name", "/absolute/missing"):  # fmt: skip
        assert not is_hub_id(name), name
    assert hub_dataset_id("uoft-cs/cifar10") == "uoft-cs/cifar10" and hub_dataset_id("mnist") == "mnist"
    assert hub_dataset_id("sklearn-digits") is None  # the embedded default: no Hub dataset
    assert hub_dataset_id("images") is None
    assert hub_model_id("someone/selfie-cifar10") == "someone/selfie-cifar10"
    assert hub_model_id(None) is None and hub_model_id("outputs/selfie-cifar10") is None


@pytest.mark.parametrize("do_train", [True, False])
def test_hub_dataset_and_base_model_of_a_run_from_the_hub(tmp_path, do_train):
    """A run on a Hub dataset from a Hub checkpoint (impossible offline to train: the card is written from a trainer
    whose log holds an evaluation). Without training, neither is the weights' origin."""
    stages = [{"task": "pretraining", "dataset": "x"}, {"task": "classification"}]
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), do_train=do_train, report_to="none")
    trainer = SelfieTrainer(
        model=SelfieForImageClassification(tiny_config()),
        args=arguments,
        card={},
        training_stages=stages,
        data_stream=RandomStream(0),
    )
    trainer.state.log_history = [{"eval_loss": 1.25, "eval_accuracy": 0.5, "eval_runtime": 0.1, "step": 4}]
    write_model_card(
        trainer,
        task="classification",
        dataset="uoft-cs/cifar10",
        dataset_description="CIFAR-10.",
        model_name_or_path="someone/selfie-cifar10",
        stages=stages,
    )
    card = card_of(tmp_path / "run")
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == {
        "loss": 1.25,
        "accuracy": 0.5,
    }
    assert {result.dataset_type for result in card.data.eval_results} == {"uoft-cs/cifar10"}
    if do_train:
        assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.base_model == "someone/selfie-cifar10"
        assert "started from the Hub model [someone/selfie-cifar10]" in card.text
    else:
        assert card.data.datasets is None and card.data.base_model is None
        assert "started from" not in card.text


def test_local_data_is_named_in_the_model_index_by_its_folder_not_its_path(tmp_path):
    data = tmp_path / "home" / "someone" / "my-images"
    data.mkdir(parents=True)
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), do_train=True, report_to="none")
    trainer = SelfieTrainer(
        model=SelfieForMaskedPatchPrediction(tiny_config()),
        args=arguments,
        card={},
        training_stages=[],
        data_stream=RandomStream(0),
    )
    trainer.state.log_history = [{"eval_loss": 2.5, "eval_candidate_accuracy": 0.5, "step": 4}]
    write_model_card(trainer, task="pretraining", dataset=str(data), dataset_description="Images.", stages=[])
    card = card_of(tmp_path / "run")
    assert {(result.dataset_type, result.dataset_name) for result in card.data.eval_results} == {
        ("my-images", "my-images (local data)")
    }
    assert str(tmp_path) not in (tmp_path / "run" / "README.md").read_text().split("---")[1]  # the YAML header
    assert card.data.datasets is None and card.data.metrics is None


@pytest.mark.parametrize(
    ("fields", "objective"),
    [
        ({}, "Selfie patch selection, 4 of 16 patches hidden at random"),
        (
            {"masking_strategy": "split", "query_type": "mlp"},
            "SplitMask split-and-match, halves of 8 and 8 patches filling in each other, queries through an MLP",
        ),
    ],
)
def test_the_objective_is_named_with_every_field_that_changes_it(fields, objective):
    assert describe_objective(SelfieConfig.from_preset("cifar10", **fields)) == objective


@pytest.mark.parametrize("script", [pretraining, classification])
def test_a_run_that_neither_trains_nor_evaluates_is_refused_and_touches_no_card(pretrained, script):
    card = (pretrained / "README.md").read_bytes()
    with pytest.raises(UserError, match=r"^Neither --do_train nor --do_eval is given, so the run would do nothing"):
        script.main(["--output_dir", str(pretrained), "--model_name_or_path", str(pretrained), *QUIET_FLAGS])
    assert (pretrained / "README.md").read_bytes() == card


def test_an_evaluation_in_a_trained_models_folder_keeps_its_card_and_writes_no_labelled_subset(tmp_path, fine_tuned):
    folder = Path(shutil.copytree(fine_tuned, tmp_path / "classifier"))
    card = (folder / "README.md").read_bytes()
    flags = ["--model_name_or_path", str(folder), "--max_eval_samples", "8", "--label_fraction", "0.5"]
    metrics = classification.main(["--output_dir", str(folder), "--do_eval", *QUIET_FLAGS, *flags])
    assert json.loads((folder / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    assert (folder / "README.md").read_bytes() == card  # the card of the training, not of this evaluation
    assert not (folder / "labelled_subset.json").exists()  # no image trained in this run

    fresh = tmp_path / "evaluation"  # elsewhere, the evaluation gets its own card
    classification.main(["--output_dir", str(fresh), "--do_eval", *QUIET_FLAGS, *flags])
    assert results_by_metric(card_of(fresh))["accuracy"].metric_value == metrics["eval_accuracy"]
