"""Frozen-feature evaluation: k-NN, linear probe, feature extraction, the k-NN monitor and run_evaluation.py."""

import json
import math
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from transformers import AutoImageProcessor, TrainerControl, TrainerState, TrainingArguments

from modeling_selfie import (
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
    preset_image_processor,
)
from selfie_training import feature_evaluation as run_evaluation
from selfie_training.checkpoints import load_training_stages
from selfie_training.data import DataArguments, image_transform, load_splits, with_image_transform
from selfie_training.evaluation import (
    KNNMonitor,
    LabelledFeatures,
    extract_features,
    knn_accuracy,
    labelled_images,
    linear_probe_accuracy,
    recalibrate_batchnorm,
)
from tests.utils import (
    QUIET_FLAGS,
    REPOSITORY,
    TINY_MODEL,
    TINY_MODEL_FLAGS,
    class_images,
    launch_two_processes,
    pretrain,
    tiny_config,
)


def clusters(num_classes: int, per_class: int, spread: float = 0.1, seed: int = 0) -> LabelledFeatures:
    """Features around one orthogonal centre a class: perfectly separable for spreads well below 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.eye(num_classes, 16)
    return LabelledFeatures(centres[labels] + spread * torch.randn(len(labels), 16, generator=generator), labels)


def noise(num_classes: int, size: int, seed: int) -> LabelledFeatures:
    """Random features with random labels: nothing to learn."""
    generator = torch.Generator().manual_seed(seed)
    return LabelledFeatures(
        torch.randn(size, 16, generator=generator), torch.randint(num_classes, (size,), generator=generator)
    )


@pytest.mark.parametrize("num_classes", [5, 6])
def test_separable_features_are_classified_perfectly_with_top5_above_five_classes(num_classes):
    train, test = clusters(num_classes, 20, seed=0), clusters(num_classes, 10, seed=1)
    knn = knn_accuracy(train, test, num_classes)
    probe = linear_probe_accuracy(train, test, num_classes)
    assert knn["knn_top1"] == 1.0 and probe["linear_probe_top1"] == 1.0
    if num_classes > 5:
        assert knn["knn_top5"] == 1.0 and probe["linear_probe_top5"] == 1.0
    else:
        assert "knn_top5" not in knn and "linear_probe_top5" not in probe


def test_random_labels_give_chance_accuracy():
    train, test = noise(4, 2000, seed=0), noise(4, 2000, seed=1)
    assert knn_accuracy(train, test, 4, k=50)["knn_top1"] == pytest.approx(0.25, abs=0.04)
    assert linear_probe_accuracy(train, test, 4)["linear_probe_top1"] == pytest.approx(0.25, abs=0.04)


def test_k_and_temperature_decide_between_the_nearest_image_and_the_crowd():
    # The query's nearest training image (cosine 1.0) is of class 0; ten more (cosine 0.9) are of class 1.
    crowd = torch.tensor([0.9, math.sqrt(1 - 0.9**2)])
    train = LabelledFeatures(
        torch.cat([torch.tensor([[1.0, 0.0]]), crowd.repeat(10, 1)]), torch.tensor([0] + [1] * 10)
    )
    test = LabelledFeatures(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert knn_accuracy(train, test, 2, k=1)["knn_top1"] == 1.0
    # All eleven vote: exp(1 / t) against 10 exp(0.9 / t); a low temperature lets the nearest one win.
    assert knn_accuracy(train, test, 2, k=11, temperature=1.0)["knn_top1"] == 0.0
    assert knn_accuracy(train, test, 2, k=11, temperature=0.01)["knn_top1"] == 1.0


def test_knn_in_chunks_equals_knn_at_once():
    train, test = noise(10, 300, seed=0), noise(10, 97, seed=1)
    assert knn_accuracy(train, test, 10, k=20, chunk_size=8) == knn_accuracy(train, test, 10, k=20, chunk_size=1000)


def test_linear_probe_is_deterministic_and_its_weight_decay_takes_effect():
    train, test = clusters(3, 30, spread=0.3, seed=0), clusters(3, 30, spread=0.3, seed=1)
    first = linear_probe_accuracy(train, test, 3)
    assert first == linear_probe_accuracy(train, test, 3)
    assert first["linear_probe_top1"] > 0.8
    # A huge penalty leaves only the bias, which predicts train's most common class (class 0 here) everywhere.
    unbalanced = LabelledFeatures(train.features[20:], train.labels[20:])  # 10 of class 0, 30 of 1 and 2 each
    unbalanced.labels[unbalanced.labels == 2] = 1
    assert linear_probe_accuracy(unbalanced, test, 3, weight_decay=1e4)["linear_probe_top1"] == pytest.approx(1 / 3)


def test_linear_probe_finds_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = clusters(3, 40, spread=0.6, seed=0), clusters(3, 40, spread=0.6, seed=1)
    scaler = StandardScaler().fit(train.features.numpy())
    # scikit-learn's C = 1 / (weight_decay * n)
    reference = LogisticRegression(C=1 / (1e-2 * 120)).fit(
        scaler.transform(train.features.numpy()), train.labels.numpy()
    )
    expected = (reference.predict(scaler.transform(test.features.numpy())) == test.labels.numpy()).mean()
    assert 0.6 < expected < 1  # neither trivial nor hopeless
    assert linear_probe_accuracy(train, test, 3, weight_decay=1e-2)["linear_probe_top1"] == pytest.approx(expected)


def image_dataset(num_classes: int = 3, per_class: int = 4) -> Dataset:
    images, labels = zip(*class_images(num_classes, per_class, size=(32, 32)), strict=True)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=num_classes)})
    return Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features)


@pytest.mark.parametrize("model_class", [SelfieModel, SelfieForMaskedPatchPrediction, SelfieForImageClassification])
def test_features_are_pooled_stage3_maps_extracted_in_batches(model_class):
    model = model_class(tiny_config()).train()
    encoder = getattr(model, "selfie", model)
    dataset = labelled_images(image_dataset(), preset_image_processor("imagenet32"), "image", "label")
    batches = []
    encoder.patch_network.conv1.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))

    extracted = extract_features(model, dataset, batch_size=5)

    assert batches == [5, 5, 2]  # ceil(12 / 5) forward passes, not 12
    assert model.training  # the mode it had before
    assert extracted.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pixel_values = torch.stack([example["pixel_values"] for example in dataset])
    with torch.no_grad():
        expected = encoder.eval().feature_map(pixel_values).mean(dim=(2, 3))
    assert extracted.features.shape == (12, 128)  # P's width: 32 channels x 4 (bottleneck)
    torch.testing.assert_close(extracted.features, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_recalibration_takes_the_statistics_of_the_images_and_restores_the_rest():
    model = SelfieForMaskedPatchPrediction(tiny_config()).eval()
    encoder = model.selfie
    norms = [module for module in encoder.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    dataset = labelled_images(image_dataset(), preset_image_processor("imagenet32"), "image", "label")
    pixel_values = torch.stack([example["pixel_values"] for example in dataset])
    with torch.no_grad():
        stem_output = encoder.patch_network.conv1(pixel_values)
    before = extract_features(model, dataset).features

    # One batch of all 12 images: the statistics are exactly theirs (a cumulative average of one batch).
    assert recalibrate_batchnorm(model, dataset, batch_size=12) == len(norms)

    stem_norm = encoder.patch_network.bn1
    torch.testing.assert_close(stem_norm.running_mean, stem_output.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stem_norm.running_var, stem_output.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-4, atol=1e-5
    )
    assert all(norm.momentum == 0.1 and norm.num_batches_tracked.item() == 1 for norm in norms)
    assert not model.training
    after = extract_features(model, dataset).features
    assert not torch.allclose(before, after, atol=1e-3)  # fresh weights' statistics (0 and 1) were not the images'


def test_batchnorm_recalibration_leaves_a_per_sample_norm_alone():
    model = SelfieModel(tiny_config(backbone_norm="groupnorm"))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    dataset = labelled_images(image_dataset(), preset_image_processor("imagenet32"), "image", "label")
    assert recalibrate_batchnorm(model, dataset) == 0
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())


def test_pretraining_can_end_with_whole_images_batchnorm_statistics(tmp_path, parquet_folder, caplog):
    output = tmp_path / "pretrained"
    # More samples asked for than the training split holds: all of it, in one evaluation batch (so the statistics
    # are exactly those of the split's images, in whatever order they come).
    flags = ["--dataset_name", str(parquet_folder), "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--per_device_eval_batch_size", "64", "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    pretrain(output, *flags, "--batchnorm_recalibration_samples", "100")
    saved = SelfieForMaskedPatchPrediction.from_pretrained(output)
    checkpoint = SelfieForMaskedPatchPrediction.from_pretrained(output / "checkpoint-2")  # patches' statistics
    stem_variance_of_patches = checkpoint.selfie.patch_network.bn1.running_var.clone()

    train = load_splits(DataArguments(dataset_name=str(parquet_folder)))["train"]
    images = with_image_transform(
        train, image_transform(AutoImageProcessor.from_pretrained(output), train=False), "img"
    )
    layers = recalibrate_batchnorm(checkpoint, images, batch_size=64)
    assert layers > 0
    expected, weights = checkpoint.state_dict(), saved.state_dict()
    statistics = [name for name in expected if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(name.startswith("selfie.patch_network.") for name in statistics)
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(weights["selfie.patch_network.bn1.running_var"], stem_variance_of_patches)

    stage = load_training_stages(str(output))[-1]
    assert stage["batchnorm_recalibration_samples"] == len(train) < 100
    assert f"BatchNorm statistics re-estimated on {len(train)} whole images" in (output / "README.md").read_text()
    # At the scripts' default log level, as the transformers examples set it (info on the main process).
    assert f"Re-estimated the statistics of {layers} BatchNorm layers on whole training images." in caplog.messages

    # Without the flag, the saved model is the last checkpoint's.
    pretrain(tmp_path / "plain", *flags)
    plain = SelfieForMaskedPatchPrediction.from_pretrained(tmp_path / "plain").state_dict()
    last = SelfieForMaskedPatchPrediction.from_pretrained(tmp_path / "plain" / "checkpoint-2").state_dict()
    assert all(torch.equal(plain[name], last[name]) for name in last)


def test_batchnorm_recalibration_needs_batchnorm(tmp_path):
    groupnorm = TINY_MODEL["config_overrides"] + ",backbone_norm=groupnorm"
    with pytest.raises(
        ValueError,
        match=r"^--batchnorm_recalibration_samples needs BatchNorm in the patch network, but its "
        r"backbone_norm is 'groupnorm'",
    ):
        pretrain(tmp_path / "run", "--config_overrides", groupnorm, "--batchnorm_recalibration_samples", "8")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"^--batchnorm_recalibration_samples 0 must be at least 1\.$"):
        pretrain(tmp_path / "run", "--batchnorm_recalibration_samples", "0")


def test_knn_monitor_logs_on_the_main_process_only_and_restores_the_mode():
    model = SelfieForMaskedPatchPrediction(tiny_config()).train()
    dataset = labelled_images(image_dataset(), preset_image_processor("imagenet32"), "image", "label")
    logged, waits = [], []
    accelerator = SimpleNamespace(wait_for_everyone=lambda: waits.append(len(logged)))
    monitor = KNNMonitor(SimpleNamespace(log=logged.append, accelerator=accelerator), dataset, dataset, 3, k=1)
    args = TrainingArguments(output_dir="unused", per_device_eval_batch_size=4, report_to="none")

    monitor.on_evaluate(args, TrainerState(is_world_process_zero=False), TrainerControl(), model=model)
    assert logged == []
    monitor.on_evaluate(args, TrainerState(), TrainerControl(), model=model)
    assert logged == [{"knn_top1": 1.0}]  # every image is its own nearest neighbour
    assert model.training
    # Every process waits at the end of the evaluation, the main one after logging: none runs ahead of it.
    assert waits == [0, 1]


def test_knn_monitor_during_pretraining(tmp_path, parquet_folder):
    output = tmp_path / "pretrained"
    pretrain(
        output,
        "--dataset_name",
        str(parquet_folder),
        "--max_steps",
        "4",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--knn_monitor_samples",
        "24",
        "--knn_k",
        "5",
    )
    log_history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in log_history if "knn_top1" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # trainer_state.json is saved before the final evaluation
    assert all(0 <= entry["knn_top1"] <= entry["knn_top5"] <= 1 for entry in logged)  # 6 classes: top-5 too

    # The step-4 figure is the saved model's k-NN accuracy, measured the same way (24 training images, 5 neighbours):
    results = run_evaluation.main(
        [
            "--model_name_or_path",
            str(output),
            "--dataset_name",
            str(parquet_folder),
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_train_samples",
            "24",
            "--protocols",
            "knn",
            "--knn_k",
            "5",
            *QUIET_FLAGS,
        ]
    )
    assert results["train_samples"] == 24
    assert results["knn_top1"] == pytest.approx(logged[-1]["knn_top1"])


def test_knn_monitor_with_two_processes(tmp_path, parquet_folder):
    result = launch_two_processes(
        REPOSITORY / "run_pretraining.py",
        "--use_cpu",
        "True",
        "--dataset_name",
        str(parquet_folder),
        "--output_dir",
        str(tmp_path / "ddp"),
        "--do_train",
        "--max_steps",
        "2",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--knn_monitor_samples",
        "16",
        *TINY_MODEL_FLAGS,
        *QUIET_FLAGS,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log_history = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in log_history if "knn_top1" in entry] == [1, 2]


def test_knn_monitor_needs_labels(tmp_path, image_folder):
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for index, path in enumerate(sorted(image_folder.rglob("*.png"))):
        path.rename(unlabelled / f"{index}.png")
    with pytest.raises(
        ValueError, match=r"^--knn_monitor_samples 8 needs labels, but the dataset has no label column"
    ):
        pretrain(tmp_path / "run", "--train_dir", str(unlabelled), "--max_steps", "1", "--knn_monitor_samples", "8")


def evaluate(tmp_path, *flags: str) -> dict:
    # The digits, in part: 200 training images (10 classes), 100 validation images.
    return run_evaluation.main(
        [
            "--output_dir",
            str(tmp_path),
            "--max_train_samples",
            "200",
            "--max_eval_samples",
            "100",
            *QUIET_FLAGS,
            *flags,
        ]
    )


def test_evaluation_writes_the_figures_and_puts_them_into_the_card(tmp_path, pretrained):
    card = f"{pretrained}/README.md"
    with open(card) as file:  # a card written before it had the section
        text = file.read().replace("<!-- frozen_features -->\n<!-- /frozen_features -->\n", "")
    with open(card, "w") as file:
        file.write(text)

    evaluate(tmp_path / "first", "--model_name_or_path", str(pretrained), "--knn_k", "10")
    results = evaluate(tmp_path / "eval", "--model_name_or_path", str(pretrained), "--labels_per_class", "5")

    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text()) == results
    assert json.loads((tmp_path / "eval" / "all_results.json").read_text()) == results
    for name in ("knn_top1", "knn_top5", "linear_probe_top1", "linear_probe_top5"):
        assert 0 <= results[name] <= 1, name
    assert results["knn_top1"] <= results["knn_top5"] and results["linear_probe_top1"] <= results["linear_probe_top5"]
    assert (results["train_samples"], results["eval_samples"]) == (50, 100)
    assert len(json.loads((tmp_path / "eval" / "labelled_subset.json").read_text())["train_indices"]) == 50

    with open(card) as file:
        text = file.read()
    assert text.count("## Frozen-feature evaluation") == 1  # the second run replaced the first's figures
    assert text.index("## Frozen-feature evaluation") < text.index("## Training data")
    assert results["knn_k"] == 50  # the default 200 asks for more neighbours than the 50 labelled images
    assert "k=50" in text and "k=10" not in text
    assert (
        f"| k-NN (k=50, temperature 0.07) | {100 * results['knn_top1']:.1f} | {100 * results['knn_top5']:.1f} |"
        in text
    )


def test_random_init_baseline_is_seeded_and_leaves_the_card_alone(tmp_path, pretrained):
    with open(f"{pretrained}/README.md") as file:
        card = file.read()
    runs = [
        evaluate(tmp_path / name, "--config_name", str(pretrained), "--protocols", "knn", "--seed", "1")
        for name in "ab"
    ]
    for results in runs:
        results.pop("eval_runtime")
    assert runs[0] == runs[1] and 0 <= runs[0]["knn_top1"] <= 1
    assert "linear_probe_top1" not in runs[0]
    with open(f"{pretrained}/README.md") as file:
        assert file.read() == card


def test_evaluation_with_recalibrated_batchnorm_says_so_and_leaves_the_checkpoint_alone(tmp_path, pretrained):
    weights = (pretrained / "model.safetensors").read_bytes()
    plain = evaluate(tmp_path / "plain", "--model_name_or_path", str(pretrained), "--protocols", "knn")
    recalibrated = evaluate(
        tmp_path / "recalibrated",
        "--model_name_or_path",
        str(pretrained),
        "--protocols",
        "knn",
        "--recalibrate_batchnorm",
    )
    assert (plain["batchnorm_recalibrated"], recalibrated["batchnorm_recalibrated"]) == (False, True)
    assert (pretrained / "model.safetensors").read_bytes() == weights
    assert "its BatchNorm statistics re-estimated on those images" in (pretrained / "README.md").read_text()


def test_an_evaluation_into_a_models_folder_is_refused_and_its_results_kept(pretrained):
    results = {name: (pretrained / name).read_bytes() for name in ("eval_results.json", "all_results.json")}
    message = (
        f"--output_dir {pretrained} holds a model (its config.json): this evaluation's eval_results.json, "
        "all_results.json and labelled_subset.json would replace its training's."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        evaluate(pretrained, "--model_name_or_path", str(pretrained))
    assert {name: (pretrained / name).read_bytes() for name in results} == results


def test_an_evaluation_of_every_image_drops_an_earlier_ones_labelled_subset(tmp_path, pretrained):
    evaluate(tmp_path, "--model_name_or_path", str(pretrained), "--protocols", "knn", "--labels_per_class", "5")
    assert (tmp_path / "labelled_subset.json").exists()
    results = evaluate(tmp_path, "--model_name_or_path", str(pretrained), "--protocols", "knn")
    assert results["train_samples"] == 200 and not (tmp_path / "labelled_subset.json").exists()


def test_bad_input_is_refused_in_one_line(tmp_path, pretrained, image_folder):
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for index, path in enumerate(sorted(image_folder.rglob("*.png"))):
        path.rename(unlabelled / f"{index}.png")
    one_class = tmp_path / "one_class" / "cat"  # datasets labels an image folder by two subfolders or more
    one_class.mkdir(parents=True)
    for path in sorted(unlabelled.iterdir())[:6]:
        shutil.copy(path, one_class)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    cases = [
        (
            ["--model_name_or_path", str(pretrained), "--train_dir", str(unlabelled)],
            r"^--train_dir .*unlabelled has its images in no class folder, so its images have no labels: a labelled "
            r"image folder holds a subfolder of images for each class, at least 2\.$",
        ),
        (
            ["--model_name_or_path", str(pretrained), "--dataset_name", str(tmp_path / "one_class")],
            r"^--dataset_name .*one_class has one class folder \('cat'\), so its images have no labels",
        ),
        (
            ["--model_name_or_path", str(pretrained), "--max_train_samples", "1"],
            r"^The training images \(--max_train_samples 1\) are of 1 class: the k-NN and the linear probe need "
            r"training images of at least 2 classes\.$",
        ),
        (["--model_name_or_path", str(bert)], r"holds a 'bert' model, not a Selfie one"),
        ([], r"^Give --model_name_or_path \(a Selfie checkpoint to evaluate\) or --config_name"),
        (["--config_name", str(pretrained), "--knn_k", "0"], r"^--knn_k 0 must be at least 1\.$"),
        (
            [
                "--config_name",
                str(pretrained),
                "--config_overrides",
                "backbone_norm=groupnorm",
                "--recalibrate_batchnorm",
            ],
            r"^--recalibrate_batchnorm re-estimates the patch network's BatchNorm statistics, but its backbone_norm is "
            r"'groupnorm', which keeps no statistics of the data: drop the flag\.$",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate(tmp_path / "run", *flags)

    command = [
        sys.executable,
        str(REPOSITORY / "run_evaluation.py"),
        "--model_name_or_path",
        str(bert),
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"run_evaluation.py: error: --model_name_or_path {bert} holds a 'bert' model, not a Selfie one."
    )
