"""`Trainer` pieces of the Selfie scripts: Selfie model cards, a stop on non-finite losses, a checkpoint on SIGINT and
SIGTERM, and the candidate accuracy in pretraining logs."""

import logging
import os
import signal

import torch
from transformers import Trainer, TrainerCallback

from .data import RandomStream
from .model_card import write_model_card


logger = logging.getLogger(__name__)

UNREADABLE_IMAGES_FILE = "unreadable_images.txt"


class SelfieTrainer(Trainer):
    """A `Trainer` for the Selfie scripts: its model card (written by the scripts, and by `push_to_hub`) is a
    Selfie model card; it stops on a non-finite loss; and it accounts for the images the collator could not read.

    `card` holds what the card needs beyond the trainer's state: `task` ("pretraining" or "classification"),
    `dataset` and `dataset_description` (where the weights came from, the card reads from the config's
    `training_stages`).
    Unreadable images are logged and appended to `unreadable_images.txt` in the output directory; the run stops
    once they are more than `max_unreadable_fraction` of the images read (counting at least 1,000, so that one bad
    file among the first few batches does not stop it).
    """

    def __init__(
        self,
        *args,
        card: dict,
        data_stream: RandomStream,
        eval_stream: RandomStream | None = None,
        max_unreadable_fraction: float = 0.01,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.card = card
        self.data_stream = data_stream
        self.eval_stream = eval_stream
        self._trained_stream_state = None  # the data stream after the last batch trained on
        self.max_unreadable_fraction = max_unreadable_fraction
        self.images_read = 0
        self.unreadable_images = 0

    def train(self, resume_from_checkpoint=None, **kwargs):
        # Restored here, before the first batch is read: Trainer restores its own generators only after that.
        if isinstance(resume_from_checkpoint, str) and os.path.isfile(self._data_rng_file(resume_from_checkpoint)):
            self.data_stream.state = torch.load(self._data_rng_file(resume_from_checkpoint), weights_only=True)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_rng_state(self, output_dir: str):
        super()._save_rng_state(output_dir)
        # Not the stream's current state: the DataLoader has already read batches ahead of the training step.
        state = self._trained_stream_state if self._trained_stream_state is not None else self.data_stream.state
        torch.save(state, self._data_rng_file(output_dir))

    def evaluate(self, *args, **kwargs):
        if self.eval_stream is not None:
            self.eval_stream.reset()  # the same masks at every evaluation, so that the figures compare
        return super().evaluate(*args, **kwargs)

    def _data_rng_file(self, checkpoint: str) -> str:
        # Every process reads its own share of the data, on its own stream.
        name = "data_rng_state.pth" if self.args.world_size == 1 else f"data_rng_state_{self.args.process_index}.pth"
        return os.path.join(checkpoint, name)

    def _prepare_inputs(self, inputs):
        inputs = dict(inputs)
        stream_state = inputs.pop("data_stream_state", None)
        if stream_state is not None and self.model.training:
            self._trained_stream_state = stream_state
        unreadable = inputs.pop("unreadable_images", [])
        self._account_for_images(unreadable, read=len(inputs["pixel_values"]) + len(unreadable))
        return super()._prepare_inputs(inputs)

    def _account_for_images(self, unreadable: list[str], read: int):
        self.images_read += read
        if not unreadable:
            return
        self.unreadable_images += len(unreadable)
        report = os.path.join(self.args.output_dir, UNREADABLE_IMAGES_FILE)
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

    def create_model_card(self, **kwargs):
        write_model_card(self, **self.card)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Before the optimiser step: the weights, and the last checkpoint on disk, are still those of good steps.
        if not torch.isfinite(loss):
            raise TrainingStopped(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1}; the checkpoints in "
                f"{self.args.output_dir} are intact. Lower --learning_rate or check the data, then run again to resume.",
                exit_status=3,
            )
        return loss


class TrainingStopped(RuntimeError):
    """Training stopped before its end, its last checkpoint intact; the scripts exit with `exit_status`."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


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
    """Logs the training candidate accuracy (the share of hidden positions whose own patch scored highest, averaged
    over the steps since the last log and over processes) beside the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._accuracy_sum, self._accuracy_steps = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            # Accumulated on the device: reading it here would synchronise every step.
            self._accuracy_sum = self._accuracy_sum + outputs.accuracy.detach()
            self._accuracy_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, start_time: float | None = None):
        if "loss" in logs and self._accuracy_steps:
            mean = torch.as_tensor(self._accuracy_sum / self._accuracy_steps, device=self.args.device)
            logs["candidate_accuracy"] = round(self.accelerator.gather(mean.reshape(1)).mean().item(), 4)
            self._accuracy_sum, self._accuracy_steps = 0.0, 0
        super().log(logs, start_time)
