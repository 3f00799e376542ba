"""The fine-tuning recipe: a learning rate of its own for the pretrained weights, steps that hold them still,
BatchNorm statistics that stay the checkpoint's, and mixed training batches."""

import shutil

import numpy
import pytest
import torch
from safetensors.torch import load_file
from timm.data import Mixup
from torch.nn.functional import one_hot
from transformers import TrainingArguments

from modeling_selfie import SelfieForImageClassification
from selfie_training.classification import freeze_batchnorm_statistics
from selfie_training.data import RandomStream
from selfie_training.trainer import ClassificationTrainer, SelfieTrainer, mix_batch
from tests.utils import TINY_MODEL_FLAGS, fine_tune, images, tiny_config


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics follow the data, frozen or not


def changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {
        name
        for name in after
        if name.startswith(prefix) and not name.endswith(BUFFERS) and not before[name].equal(after[name])
    }


@pytest.mark.parametrize("head", ["resnet", "attention_pooling"])
def test_a_pretrained_learning_rate_of_zero_keeps_the_pretrained_weights_and_trains_the_head(
    tmp_path, pretrained, head
):
    flags = ["--model_name_or_path", str(pretrained), "--classifier_head", head, "--max_steps", "3",
             "--per_device_train_batch_size", "8", "--max_eval_samples", "16", "--learning_rate", "0.01"]  # fmt: skip
    start = load_file(f"{pretrained}/model.safetensors")
    fine_tune(tmp_path / "frozen", *flags, "--pretrained_learning_rate", "0")
    fine_tune(tmp_path / "trained", *flags)
    frozen, trained = (load_file(tmp_path / name / "model.safetensors") for name in ("frozen", "trained"))
    assert not changed(start, frozen, "selfie.")
    assert changed(start, trained, "selfie.")  # the same run without the flag trains them
    assert not frozen["classifier.weight"].equal(trained["classifier.weight"])  # the head trained in both, differently


def test_the_pretrained_learning_rate_applies_to_the_base_models_parameters_only(tmp_path):
    model = SelfieForImageClassification(tiny_config())
    arguments = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.004, weight_decay=0.05, report_to="none")
    trainer = SelfieTrainer(
        model=model,
        args=arguments,
        card={},
        training_stages=[],
        data_stream=RandomStream(0),
        pretrained_learning_rate=0.001,
    )
    base = {id(parameter) for parameter in model.base_model.parameters()}
    learning_rates = {}
    for group in trainer.create_optimizer().param_groups:
        kinds = {id(parameter) in base for parameter in group["params"]}
        assert len(kinds) == 1  # no group mixes pretrained and fresh parameters
        learning_rates.setdefault(kinds.pop(), set()).add((group["lr"], group["weight_decay"]))
    assert learning_rates == {True: {(0.001, 0.05), (0.001, 0.0)}, False: {(0.004, 0.05), (0.004, 0.0)}}
    assert sum(len(group["params"]) for group in trainer.optimizer.param_groups) == len(list(model.parameters()))


def test_a_pretrained_learning_rate_needs_pretrained_weights(tmp_path):
    with pytest.raises(ValueError, match=r"^--pretrained_learning_rate needs pretrained weights"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--pretrained_learning_rate", "0.001")
    with pytest.raises(ValueError, match=r"^--pretrained_learning_rate -1.0 must be at least 0"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--pretrained_learning_rate", "-1")


def test_frozen_pretrained_steps_hold_the_pretrained_learning_rate_at_zero_then_warm_it_up(tmp_path):
    model = SelfieForImageClassification(tiny_config())
    arguments = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=0.004, warmup_steps=2, lr_scheduler_type="cosine", report_to="none"
    )
    trainer = SelfieTrainer(
        model=model, args=arguments, card={}, training_stages=[], data_stream=RandomStream(0), pretrained_learning_rate=0.001,
        freeze_pretrained_steps=3,
    )  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = {True: [], False: []}  # by step: the pretrained groups' learning rate, and the head's
    for _ in range(10):
        for pretrained in rates:
            group_rates = {
                group["lr"] for group in trainer.optimizer.param_groups if group.get("pretrained", False) is pretrained
            }
            assert len(group_rates) == 1  # weight-decay groups alike
            rates[pretrained].append(group_rates.pop())
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    head_schedule = [rate / 0.004 for rate in rates[False]]
    assert head_schedule[:3] == [0.0, 0.5, 1.0] and head_schedule[3] < 1.0  # the head's warm-up and cosine
    assert rates[True][:4] == [0.0] * 4
    assert rates[True][4] == pytest.approx(0.001 * head_schedule[4] / 2)  # half way through its own warm-up
    assert rates[True][5:] == pytest.approx([0.001 * factor for factor in head_schedule[5:]])


def test_frozen_pretrained_steps_keep_the_pretrained_weights_for_that_many_steps(tmp_path, pretrained):
    flags = ["--model_name_or_path", str(pretrained), "--per_device_train_batch_size", "8", "--max_eval_samples",
             "16", "--learning_rate", "0.01", "--freeze_pretrained_steps", "3"]  # fmt: skip
    start = load_file(f"{pretrained}/model.safetensors")
    fine_tune(tmp_path / "run", *flags, "--max_steps", "6", "--save_steps", "3")
    frozen, thawed = (load_file(tmp_path / "run" / name / "model.safetensors") for name in ("checkpoint-3", "."))
    assert not changed(start, frozen, "selfie.")
    assert changed(start, thawed, "selfie.")


def test_frozen_pretrained_steps_need_pretrained_weights_and_a_schedule_of_factors(tmp_path, pretrained):
    with pytest.raises(ValueError, match=r"^--freeze_pretrained_steps needs pretrained weights"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--freeze_pretrained_steps", "1")
    with pytest.raises(ValueError, match=r"^--freeze_pretrained_steps -1 must be at least 0"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--freeze_pretrained_steps", "-1")
    with pytest.raises(ValueError, match=r"^--freeze_pretrained_steps needs a schedule of learning rate factors"):
        fine_tune(tmp_path / "plateau", "--model_name_or_path", str(pretrained), "--max_steps", "2",
                  "--freeze_pretrained_steps", "1", "--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "epoch")  # fmt: skip


def test_layer_decay_lowers_the_learning_rate_stage_by_stage_down_the_patch_network(tmp_path):
    model = SelfieForImageClassification(tiny_config())
    arguments = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.004, weight_decay=0.05, report_to="none")
    trainer = SelfieTrainer(
        model=model, args=arguments, card={}, training_stages=[], data_stream=RandomStream(0), pretrained_learning_rate=0.001,
        layer_decay=0.5,
    )  # fmt: skip
    rate_of = {
        id(parameter): group["lr"]
        for group in trainer.create_optimizer().param_groups
        for parameter in group["params"]
    }
    rates = {}  # the top-level module of each parameter: the learning rates of its parameters
    for name, parameter in model.named_parameters():
        module = name.removeprefix("selfie.patch_network.").split(".")[0]
        rates.setdefault(module, set()).add(rate_of[id(parameter)])
    assert rates == {
        "conv1": {0.000125}, "bn1": {0.000125}, "layer1": {0.00025}, "layer2": {0.0005}, "layer3": {0.001},
        "layer4": {0.004}, "classifier": {0.004},
    }  # fmt: skip


def test_layer_decay_needs_pretrained_weights_and_a_factor_up_to_1(tmp_path):
    with pytest.raises(ValueError, match=r"^--layer_decay needs pretrained weights"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--layer_decay", "0.5")
    with pytest.raises(ValueError, match=r"^--layer_decay 1.5 must be more than 0 and at most 1"):
        fine_tune(tmp_path / "run", *TINY_MODEL_FLAGS, "--max_steps", "1", "--layer_decay", "1.5")


def test_a_run_with_the_pretrained_recipe_resumed_across_the_thaw_ends_where_the_uninterrupted_one_does(
    tmp_path, pretrained
):
    flags = ["--model_name_or_path", str(pretrained), "--per_device_train_batch_size", "8", "--max_eval_samples",
             "16", "--max_steps", "6", "--save_steps", "3", "--warmup_steps", "1", "--pretrained_learning_rate",
             "0.002", "--layer_decay", "0.5", "--freeze_pretrained_steps", "4"]  # fmt: skip
    fine_tune(tmp_path / "uninterrupted", *flags)
    output = tmp_path / "interrupted"
    fine_tune(output, *flags)
    for path in output.iterdir():  # what a run killed after its step-3 checkpoint, still frozen, leaves behind
        if path.name != "checkpoint-3":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    fine_tune(output, *flags)  # the same command again
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    for name, tensor in load_file(output / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


def test_frozen_batchnorm_statistics_normalise_as_in_eval_mode_and_stay_as_they_are():
    config = tiny_config()
    model = SelfieForImageClassification(config).train()
    patch_network = model.selfie.patch_network
    patch_network.forward_features(images(config, batch_size=4) * 3 + 1)  # running statistics away from 0 and 1
    freeze_batchnorm_statistics(patch_network)
    statistics = {name: buffer.clone() for name, buffer in patch_network.named_buffers()}
    pixel_values = images(config, batch_size=4)
    model.train()  # as Trainer does at every step
    features = patch_network.forward_features(pixel_values)
    assert all(buffer.equal(statistics[name]) for name, buffer in patch_network.named_buffers())
    torch.testing.assert_close(features, patch_network.eval().forward_features(pixel_values))
    model.train()
    model(pixel_values, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert patch_network.bn1.weight.grad.abs().sum() > 0  # scale and shift still train
    assert model.layer4[0].bn1.training  # the fresh stage 4 is left alone


def test_frozen_pretrained_batchnorm_keeps_the_checkpoints_statistics_through_fine_tuning(tmp_path, pretrained):
    flags = ["--model_name_or_path", str(pretrained), "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--max_eval_samples", "16", "--learning_rate", "0.01"]  # fmt: skip
    start = load_file(f"{pretrained}/model.safetensors")
    fine_tune(tmp_path / "frozen", *flags, "--freeze_pretrained_batchnorm", "True")
    fine_tune(tmp_path / "batch", *flags)
    frozen, batch = (load_file(tmp_path / name / "model.safetensors") for name in ("frozen", "batch"))
    statistics = [name for name in start if name.startswith("selfie.patch_network.") and name.endswith(BUFFERS)]
    assert statistics and all(frozen[name].equal(start[name]) for name in statistics)
    assert not all(batch[name].equal(start[name]) for name in statistics)  # without the flag they follow the batches
    assert not frozen["selfie.patch_network.bn1.weight"].equal(start["selfie.patch_network.bn1.weight"])
    with pytest.raises(ValueError, match=r"^--freeze_pretrained_batchnorm needs pretrained weights"):
        fine_tune(tmp_path / "fresh", *TINY_MODEL_FLAGS, "--max_steps", "1", "--freeze_pretrained_batchnorm", "True")


def test_mixup_blends_each_image_with_its_reverse_partner_and_their_labels_alike():
    numpy.random.seed(0)
    mixing = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=3)
    pixel_values, labels = torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 1, 2])
    mixed, targets = mix_batch(mixing, pixel_values, labels)
    lam = targets[0, 0].item()  # image 0 (class 0) is blended with image 3 (class 1)
    assert 0 < lam < 1
    for i, partner in ((0, 3), (1, 2), (2, 1), (3, 0)):
        torch.testing.assert_close(mixed[i], lam * pixel_values[i] + (1 - lam) * pixel_values[partner])
        expected = lam * one_hot(labels[i], 3).float() + (1 - lam) * one_hot(labels[partner], 3).float()
        torch.testing.assert_close(targets[i], expected)
    assert mixed[4].equal(pixel_values[4])  # an odd batch's last image has no partner
    assert targets[4].tolist() == [0.0, 0.0, 1.0]
    assert not mixed[0].equal(pixel_values[0])  # the caller's batch is left as it was: mixed in a copy


def test_cutmix_pastes_a_box_of_the_partner_and_weighs_the_labels_by_its_area():
    mixing = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=2)
    pixel_values = torch.stack([torch.full((3, 8, 8), 0.0), torch.full((3, 8, 8), 1.0)])
    smoothed = torch.tensor([[0.95, 0.05], [0.05, 0.95]])  # label smoothing 0.1 over 2 classes
    numpy.random.seed(0)
    shares = []
    for _ in range(5):  # boxes of several sizes (a small one may round to nothing)
        mixed, targets = mix_batch(mixing, pixel_values, torch.tensor([0, 1]))
        from_partner = (mixed[0] == 1.0).float().mean().item()  # image 0's pixels taken from image 1
        assert set(mixed.unique().tolist()) <= {0.0, 1.0}  # pasted, not blended
        torch.testing.assert_close(targets[0], (1 - from_partner) * smoothed[0] + from_partner * smoothed[1])
        shares.append(from_partner)
    assert any(0 < share < 1 for share in shares)


def test_mixed_training_batches_train_on_soft_targets_and_evaluation_reads_images_as_they_are(tmp_path):
    model = SelfieForImageClassification(tiny_config(num_labels=3))
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    mixing = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=3)
    trainer = ClassificationTrainer(
        model=model, args=arguments, card={}, training_stages=[], data_stream=RandomStream(0), mixing=mixing
    )
    inputs = {"pixel_values": images(model.config, batch_size=4), "labels": torch.tensor([0, 1, 2, 0])}
    model.eval()  # the same features either way: no batch statistics in the comparison
    numpy.random.seed(0)
    mixed, targets = mix_batch(mixing, inputs["pixel_values"], inputs["labels"])
    expected = torch.nn.functional.cross_entropy(model(mixed).logits, targets)
    model.training = True  # what compute_loss reads, with no module's behaviour changed
    numpy.random.seed(0)
    torch.testing.assert_close(trainer.compute_loss(model, inputs), expected)
    model.training = False
    torch.testing.assert_close(trainer.compute_loss(model, inputs), model(**inputs).loss)


def test_mixing_flags_change_the_run_and_refuse_negative_strengths(tmp_path):
    flags = [*TINY_MODEL_FLAGS, "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_eval_samples", "16"]
    plain = fine_tune(tmp_path / "plain", *flags)
    cutmix = fine_tune(tmp_path / "cutmix", *flags, "--cutmix_alpha", "1.0", "--mixup_alpha", "0.2")
    assert cutmix["train_loss"] != plain["train_loss"]
    plain_weights, cutmix_weights = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "cutmix"))
    assert not plain_weights["classifier.weight"].equal(cutmix_weights["classifier.weight"])
    with pytest.raises(ValueError, match=r"^--cutmix_alpha -1.0 must be at least 0"):
        fine_tune(tmp_path / "negative", *flags, "--cutmix_alpha", "-1")
