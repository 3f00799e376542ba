"""`Trainer` pieces of the Selfie scripts: Selfie model cards, a stop on non-finite losses, a checkpoint on SIGINT and
SIGTERM, checks on the checkpoint to resume, the candidate accuracy in pretraining logs, and mixed batches in
fine-tuning."""

import errno
import functools
import logging
import math
import os
import signal
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch import nn
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput
from transformers.utils import SAFE_WEIGHTS_NAME

from .checkpoints import load_selfie_config, save_training_stages, saved_model_class
from .data import RandomStream
from .errors import TrainingStopped, UserError
from .hub import push_errors_in_one_line
from .model_card import set_section, write_model_card
from .resident_images import DeviceStream, ResidentImages
from .trainer_hooks import TrainerHooks
from .visualization import PretextFigure


logger = logging.getLogger(__name__)

UNREADABLE_IMAGES_FILE = "unreadable_images.txt"


class SelfieTrainer(TrainerHooks):
    """A `Trainer` for the Selfie scripts: its model card (written by the scripts, and by `push_to_hub`) is a
    Selfie model card; it stops after a non-finite loss, before it next logs or saves; and it accounts for the images
    that could not be read.

    `card` holds what the card needs beyond the trainer's state: the keyword arguments of `write_model_card` (`task`,
    `dataset`, `dataset_description`, `evaluation_split`, `model_name_or_path`). `training_stages`, where the weights
    came from (`runner.training_stages`), is saved beside every checkpoint's weights and shown in the card.
    Unreadable images are logged and appended to `unreadable_images.txt` in the output directory; the run stops
    once they are more than `max_unreadable_fraction` of the images read (counting at least 1,000, so that one bad
    file among the first few batches does not stop it).
    Resuming, it refuses a checkpoint of another model, and trains no further a run that the checkpoint finished.
    """

    def __init__(
        self,
        *args,
        card: dict,
        training_stages: list[dict],
        data_stream: RandomStream | DeviceStream,
        eval_stream: RandomStream | DeviceStream | None = None,
        max_unreadable_fraction: float = 0.01,
        pretrained_learning_rate: float | None = None,
        layer_decay: float = 1.0,
        freeze_pretrained_steps: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.card = card
        self.training_stages = training_stages
        self.pretrained_learning_rate = pretrained_learning_rate
        self.layer_decay = layer_decay
        self.freeze_pretrained_steps = freeze_pretrained_steps
        self.data_stream = data_stream
        self.eval_stream = eval_stream
        self._trained_stream_state = None  # the data stream after the last batch trained on
        self.max_unreadable_fraction = max_unreadable_fraction
        self.images_read = 0
        self.unreadable_images = 0
        for split in (self.train_dataset, self.eval_dataset):
            if isinstance(split, ResidentImages):  # read whole at load, by every process: named by one
                read = len(split) + len(split.unreadable)
                self._account_for_images(split.unreadable, read, named_here=self.is_world_process_zero())
        self.non_finite_loss = FirstNonFiniteLoss()
        self.loss_terms = {}  # the terms of the last training loss, where it has several (`PretrainingTrainer`)
        # In place of Trainer's own filter of non-finite losses, which reads the loss back at every step.
        self.args.logging_nan_inf_filter = False

    def init_hf_repo(self, *args, **kwargs):
        with push_errors_in_one_line(self.args):
            super().init_hf_repo(*args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        with push_errors_in_one_line(self.args):
            return super().push_to_hub(*args, **kwargs)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if self.freeze_pretrained_steps:
            self._check_steps_after_freezing()
        if isinstance(resume_from_checkpoint, str):
            self._check_same_model(resume_from_checkpoint)
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            max_steps = self._max_steps()
            if state.global_step >= max_steps:
                return self._finished_run(resume_from_checkpoint, state, max_steps)
            # Restored here, before the first batch is read: Trainer restores its own generators only after that.
            if os.path.isfile(self._data_rng_file(resume_from_checkpoint)):
                self._restore_data_stream(self._data_rng_file(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _restore_data_stream(self, path: str):
        """The data stream's state saved in `path`, where it is one of this run's stream: a run resumed on another
        kind of device, or on the other data path (`resident_images`), cannot draw what the first would have."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        current = self.data_stream.state
        if type(state) is not type(current) or len(state) != len(current):
            logger.warning(
                "%s holds the data stream of another pipeline (per-image, or resident on another kind of device): "
                "this run's stream starts afresh from --seed.",
                path,
            )
            return
        self.data_stream.state = state

    def _check_steps_after_freezing(self):
        """Pretrained weights held still for the whole run would not be fine-tuned at all, while the card says they
        were: refused before the first step."""
        max_steps = self._max_steps()
        if self.freeze_pretrained_steps >= max_steps:
            raise UserError(
                f"--freeze_pretrained_steps {self.freeze_pretrained_steps} holds the pretrained weights still for "
                f"all the run's {max_steps} steps: none of them would be fine-tuned. Give fewer steps."
            )

    def _check_same_model(self, checkpoint: str):
        """A checkpoint of another model class or architecture (another task's, another run's in the same
        --output_dir) is never this run's to resume: refused in one line, where Trainer would fail on its tensors."""
        saved_class = saved_model_class(load_selfie_config(checkpoint, "--resume_from_checkpoint")).__name__
        with safe_open(os.path.join(checkpoint, SAFE_WEIGHTS_NAME), "pt") as file:
            saved = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
        built = {name: tuple(tensor.shape) for name, tensor in self.model.state_dict().items()}
        if saved_class != type(self.model).__name__:
            difference = f"it holds a {saved_class}; this run trains a {type(self.model).__name__}"
        elif saved != built:
            name = min(name for name in saved.keys() | built.keys() if saved.get(name) != built.get(name))
            difference = f"its tensor {name!r} is {saved.get(name, 'absent')}, this run's {built.get(name, 'absent')}"
        else:
            return
        raise UserError(
            f"{checkpoint} is another run's checkpoint ({difference}): give this run another --output_dir."
        )

    def _max_steps(self) -> int:
        """The step this run trains to: --max_steps, or as many as Trainer computes for --num_train_epochs."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def _finished_run(self, checkpoint: str, state: TrainerState, max_steps: int) -> TrainOutput:
        """The end of the run that `checkpoint` finished, with nothing trained: Trainer would resume it and, where
        the run ends mid-epoch, train a step more (it looks for the end only after a step). Its weights, the best
        checkpoint's under --load_best_model_at_end as Trainer leaves them, and its state: the final one in
        --output_dir where that is saved (it logs the training's summary, which the model card reads)."""
        logger.warning(
            "%s is at step %d of this run's %d: the run had finished, and is not trained further.",
            checkpoint,
            state.global_step,
            max_steps,
        )
        try:
            final_state = TrainerState.load_from_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))
        except (OSError, ValueError, TypeError):  # not saved yet, or cut short by a kill
            final_state = state
        self.state = final_state if final_state.global_step == state.global_step else state
        self.load_finished_run(checkpoint)
        return TrainOutput(self.state.global_step, None, {})

    def evaluate(self, *args, **kwargs):
        if self.eval_stream is not None:
            self.eval_stream.reset()  # the same masks at every evaluation, so that the figures compare
        return super().evaluate(*args, **kwargs)

    def save_data_stream(self, checkpoint: str):
        # Not the stream's current state: the DataLoader has already read batches ahead of the training step.
        state = self._trained_stream_state if self._trained_stream_state is not None else self.data_stream.state
        torch.save(state, self._data_rng_file(checkpoint))

    def _data_rng_file(self, checkpoint: str) -> str:
        # Every process reads its own share of the data, on its own stream.
        name = "data_rng_state.pth" if self.args.world_size == 1 else f"data_rng_state_{self.args.process_index}.pth"
        return os.path.join(checkpoint, name)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._take_batch_notes(inputs, training=False)
        if len(inputs["pixel_values"]) == 0:  # no image of the batch could be read: named and counted, no outputs
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _take_batch_notes(self, inputs: dict, training: bool) -> dict:
        """The batch without what `collate_images` notes beside the model's inputs: the data stream's state after
        the batch (kept for the next checkpoint, for training batches) and the images it could not read."""
        inputs = dict(inputs)
        stream_state = inputs.pop("data_stream_state", None)
        if stream_state is not None and training:
            self._trained_stream_state = stream_state
        unreadable = inputs.pop("unreadable_images", [])
        self._account_for_images(unreadable, read=len(inputs["pixel_values"]) + len(unreadable))
        return inputs

    def _account_for_images(self, unreadable: list[str], read: int, named_here: bool = True):
        """Count the images read and the unreadable ones among them, naming these where `named_here`."""
        self.images_read += read
        if not unreadable:
            return
        self.unreadable_images += len(unreadable)
        report = os.path.join(self.args.output_dir, UNREADABLE_IMAGES_FILE)
        if named_here:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(report, "a") as file:
                file.writelines(f"{name}\n" for name in unreadable)
            for name in unreadable:
                logger.warning("Skipped an unreadable image: %s", name)
        if self.unreadable_images > self.max_unreadable_fraction * max(self.images_read, 1000):
            raise TrainingStopped(
                f"{self.unreadable_images} of the {self.images_read} images read so far could not be decoded, more "
                f"than --max_unreadable_fraction {self.max_unreadable_fraction}; they are listed in {report}. "
                "Remove or repair them (or raise the limit), then run the same command again to resume.",
                exit_status=2,
            )

    def create_optimizer(self, model=None):
        """The Trainer's optimizer. With `pretrained_learning_rate`, `layer_decay` or `freeze_pretrained_steps`, the
        base model's parameters (`selfie.*`: what a classifier takes over from pretraining) go in groups of their own
        (marked `"pretrained"`): at `pretrained_learning_rate` (default --learning_rate) times `layer_decay` to the
        power of their depth below P's top stage (`pretrained_depths`); the fresh head trains at --learning_rate.
        The schedule scales every group alike, but for the pretrained groups' first `freeze_pretrained_steps`
        (`create_scheduler`)."""
        optimizer = super().create_optimizer(model)
        if self.pretrained_learning_rate is None and self.layer_decay == 1 and not self.freeze_pretrained_steps:
            return optimizer
        model = self.model if model is None else model
        depths = pretrained_depths(model.base_model)
        groups = []
        for group in optimizer.param_groups:
            options = {key: value for key, value in group.items() if key != "params"}
            top_rate = options["lr"] if self.pretrained_learning_rate is None else self.pretrained_learning_rate
            by_rate = {}  # (pretrained, learning rate) -> parameters
            for parameter in group["params"]:
                depth = depths.get(id(parameter))
                key = (False, options["lr"]) if depth is None else (True, top_rate * self.layer_decay**depth)
                by_rate.setdefault(key, []).append(parameter)
            # The fresh head's group first, as before there were several pretrained ones: checkpoints still resume.
            groups += [
                {**options, "params": parameters, "lr": rate, "pretrained": pretrained}
                for (pretrained, rate), parameters in sorted(by_rate.items(), key=lambda item: item[0][0])
            ]
        optimizer.param_groups = []  # regrouped in place: the optimizer has no state yet
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule; with `freeze_pretrained_steps`, the pretrained groups stay at a learning rate of 0
        for that many steps while the fresh head learns to read their features (LP-FT, Kumar et al. 2022: a random
        head's first gradients distort pretrained features), then warm up again over --warmup_steps into the schedule."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not (created and self.freeze_pretrained_steps):
            return scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise UserError(
                f"--freeze_pretrained_steps needs a schedule of learning rate factors; --lr_scheduler_type "
                f"{self.args.lr_scheduler_type} is not one."
            )
        warmup_steps = self.args.get_warmup_steps(num_training_steps)
        for index, group in enumerate(scheduler.optimizer.param_groups):
            if group.get("pretrained"):
                scheduler.lr_lambdas[index] = functools.partial(
                    _after_frozen_steps, scheduler.lr_lambdas[index], self.freeze_pretrained_steps, warmup_steps
                )
                group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)
        return scheduler

    def create_model_card(self, **kwargs):
        write_model_card(self, stages=self.training_stages, **self.card)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Trainer saves every checkpoint through here too: none holds weights of a step whose loss was not finite,
        # and each carries the stages that its weights went through.
        self._stop_after_a_non_finite_loss()
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            save_training_stages(output_dir or self.args.output_dir, self.training_stages)

    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = self._take_batch_notes(inputs, training=True)
        if len(inputs["pixel_values"]) == 0:
            # No image of the batch could be read (`collate_images`): they are named and counted; step on zero
            # gradients (not none, which fp16's gradient scaler refuses), so that training goes on.
            loss = sum(parameter.sum() for parameter in model.parameters() if parameter.requires_grad) * 0.0
            self.accelerator.backward(loss)
            return loss.detach()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.non_finite_loss.record(loss, step=self.state.global_step + 1, terms=self.loss_terms)
        return loss

    def log(self, logs: dict, start_time: float | None = None):
        if "loss" in logs:  # the training loss, which every process logs at the same steps (the check gathers)
            self._stop_after_a_non_finite_loss()
        super().log(logs, start_time)

    def _stop_after_a_non_finite_loss(self):
        """Stop the run, before it logs or saves anything more, if the loss of a step was not finite: the weights
        after that step are not, nor will they be. Every process stops alike, on the earliest such step of any."""
        found = self.non_finite_loss.read(self.accelerator)
        if found is not None:
            step, loss, terms = found
            described = f" ({', '.join(f'{name} {value:.4g}' for name, value in terms.items())})" if terms else ""
            raise TrainingStopped(
                f"The training loss became {loss} at step {step}{described}; the checkpoints in "
                f"{self.args.output_dir} are intact (the run stopped at step {self.state.global_step}, before saving "
                f"the weights of any step from then on). {self._likely_cause(step, terms)}",
                exit_status=3,
            )

    def _likely_cause(self, step: int, terms: dict[str, float]) -> str:
        """What most likely made the loss non-finite, and what to change: from the loss's terms at that step and
        the config."""
        if terms and all(map(math.isfinite, terms.values())):
            # Each term finite, their sum not: the weight of the image contrastive term overflowed it.
            weight = self.model.config.image_contrastive_weight
            return (
                f"Its terms were finite, so the config's image_contrastive_weight={weight:g}, which weighs the "
                "image contrastive term, overflowed their sum: lower it (--config_overrides), then run again."
            )
        if step == 1:
            return (
                "It was the first step, before any update, so not --learning_rate: check the data and the config's "
                "fields (--config_overrides), then run again."
            )
        return "Lower --learning_rate or check the data, then run again to resume."


class FirstNonFiniteLoss:
    """The first training step whose loss was not finite, and that loss, recorded on the device: testing the loss on
    the host would make it wait for the device at every step; `read` waits only when the trainer logs or saves."""

    NONE = torch.iinfo(torch.long).max  # the step recorded while every loss is finite

    def __init__(self):
        self.step = self.loss = None
        self.terms = {}

    def record(self, loss: torch.Tensor, step: int, terms: dict[str, torch.Tensor] | None = None):
        """`loss` of training step `step`, and the terms it sums, where it has several."""
        if self.step is None:
            self.step = torch.full((), self.NONE, dtype=torch.long, device=loss.device)
            self.loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = torch.isfinite(loss).logical_not() & (self.step == self.NONE)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)
        for name, value in (terms or {}).items():
            self.terms[name] = torch.where(first, value.float(), self.terms.get(name, torch.zeros_like(loss).float()))

    def read(self, accelerator) -> tuple[int, float, dict[str, float]] | None:
        """The earliest such step of all processes, its loss and the loss's terms, or None."""
        if self.step is None:  # no training step yet, on any process
            return None
        steps, losses = (accelerator.gather(tensor.reshape(1)) for tensor in (self.step, self.loss))
        first = steps.argmin()
        step = int(steps[first])
        if step == self.NONE:
            return None
        terms = {name: float(accelerator.gather(value.reshape(1))[first]) for name, value in self.terms.items()}
        return step, float(losses[first]), terms


@contextmanager
def stop_when_disk_full(output_dir: str):
    """A full disk while saving ends the run in one line, where torch and safetensors would raise errors that never
    say so ("enforce fail at inline_container.cc", "IoError(... StorageFull ...)"). Trainer writes a checkpoint's
    trainer_state.json last and deletes older checkpoints only after it, so the checkpoints saved before are intact
    and the half-written one is skipped on resuming."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        if not _is_disk_full(error):
            raise
        raise TrainingStopped(
            f"No space left on the device of {output_dir} while saving; the checkpoints saved before are intact: "
            "free some space, then run the same command again to resume.",
            exit_status=2,
        ) from error


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(sign in str(error) for sign in DISK_FULL_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


# How torch's zip writer and safetensors report ENOSPC, without its errno.
DISK_FULL_SIGNS = ("No space left on device", "file write failed", "StorageFull")


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the step under way, save a checkpoint and stop training; `signal` then says which
    signal came. A second signal acts at once, as it would without this callback."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self._previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._receive)

    def _receive(self, signum, frame):
        self.signal = signal.Signals(signum)
        self._restore_handlers()

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}


class PretrainingTrainer(SelfieTrainer):
    """Logs, beside the loss, the training candidate accuracy (the share of positions filled in whose own patch scored
    highest) and, where the objective has more than one term, each term: the patch-selection loss and the image
    contrastive loss. Each is averaged over the steps since the last log and over processes. With `pretext_figure`,
    its model card shows the pretext task as the model does it."""

    # The model's outputs logged, and their names in the logs.
    LOGGED_OUTPUTS = {
        "accuracy": "candidate_accuracy",
        "patch_selection_loss": "patch_selection_loss",
        "image_contrastive_loss": "image_contrastive_loss",
    }

    def __init__(self, *args, pretext_figure: PretextFigure | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pretext_figure = pretext_figure
        self._output_sums, self._output_steps = {}, 0

    def create_model_card(self, **kwargs):
        """The card, with the figure of the pretext task. The figure is drawn at the first call, which the scripts
        make on every process (the model's forward may gather across processes); a later call (`push_to_hub`'s, on
        the main process only) shows it as drawn."""
        figure = self.pretext_figure
        if figure is not None and figure.images is None:
            figure.write(self.model, self.args.output_dir, self.is_world_process_zero())
        super().create_model_card(**kwargs)
        if figure is not None and figure.images and self.is_world_process_zero():
            card = os.path.join(self.args.output_dir, "README.md")
            set_section(card, "pretext_task", figure.card_section(self.model.config.masking_strategy == "split"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training and outputs.image_contrastive_loss is not None:  # a loss of two terms
            self.loss_terms = {
                name: outputs[name].detach() for name in ("patch_selection_loss", "image_contrastive_loss")
            }
        if model.training:
            # Summed on the device: reading them here would synchronise every step.
            for name in self.LOGGED_OUTPUTS:
                if outputs.get(name) is not None:
                    self._output_sums[name] = self._output_sums.get(name, 0.0) + outputs[name].detach()
            self._output_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, start_time: float | None = None):
        if "loss" in logs and self._output_steps:
            terms = self._output_sums
            if "image_contrastive_loss" not in terms:  # one term: the selection loss is the loss already logged
                terms.pop("patch_selection_loss", None)
            for name, total in terms.items():
                mean = torch.as_tensor(total / self._output_steps, device=self.args.device)
                logs[self.LOGGED_OUTPUTS[name]] = round(self.accelerator.gather(mean.reshape(1)).mean().item(), 4)
            self._output_sums, self._output_steps = {}, 0
        super().log(logs, start_time)


class ClassificationTrainer(SelfieTrainer):
    """The fine-tuning trainer. With `mixing` (timm's `Mixup`: Mixup, CutMix, or either at random), each training batch
    is mixed and trained on the soft targets it makes, which carry --label_smoothing_factor; evaluation reads the
    images as they are, with the Trainer's own loss."""

    def __init__(self, *args, mixing: Mixup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixing = mixing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mixing is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        pixel_values, targets = mix_batch(self.mixing, inputs.pop("pixel_values"), inputs.pop("labels"))
        outputs = model(pixel_values=pixel_values, **inputs)
        loss = nn.functional.cross_entropy(outputs.logits.float(), targets)
        return (loss, outputs) if return_outputs else loss


def mix_batch(mixing: Mixup, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mixed by `mixing` and its soft targets. timm pairs image i with image n-1-i and mixes in place, so
    the images are copied first; in an odd batch (the epoch's last, or one with unreadable images) the last image
    has no partner and stays as it is."""
    paired = len(labels) - len(labels) % 2
    pixel_values = pixel_values.clone()
    targets = []
    if paired:
        targets.append(mixing(pixel_values[:paired], labels[:paired])[1])  # mixes the view, so pixel_values too
    if paired < len(labels):
        targets.append(mixup_target(labels[paired:], mixing.num_classes, 1.0, mixing.label_smoothing))
    return pixel_values, torch.cat(targets)


def pretrained_depths(base_model) -> dict[int, int]:
    """The depth of each of the base model's parameters (by `id`) below the top of the patch network P: 0 for stage 3
    (and for A and the position embeddings above it), 1 for stage 2, 2 for stage 1, 3 for the stem."""
    stages = base_model.patch_stages()
    depths = {id(parameter): 0 for parameter in base_model.parameters()}
    depths.update({id(parameter): len(stages) for parameter in base_model.patch_network.parameters()})  # the stem
    for depth, stage in enumerate(reversed(stages)):
        depths.update({id(parameter): depth for parameter in stage.parameters()})
    return depths


def _after_frozen_steps(schedule, frozen_steps: int, warmup_steps: int, step: int) -> float:
    """The learning rate factor of weights held still for `frozen_steps`, then warmed up linearly over
    `warmup_steps` into `schedule`."""
    if step < frozen_steps:
        return 0.0
    return min(1.0, (step - frozen_steps) / max(warmup_steps, 1)) * schedule(step)
