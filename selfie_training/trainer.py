"""`Trainer` subclasses of the Selfie scripts: Selfie model cards, and the candidate accuracy in pretraining logs."""

import torch
from transformers import Trainer

from .model_card import write_model_card


class SelfieTrainer(Trainer):
    """A `Trainer` whose model card (written by the scripts, and by `push_to_hub`) is a Selfie model card.

    `card` holds what the card needs beyond the trainer's state: `task` ("pretraining" or "classification"),
    `dataset` and `dataset_description`, and for classifiers `origin` (where the patch network came from).
    """

    def __init__(self, *args, card: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.card = card

    def create_model_card(self, **kwargs):
        write_model_card(self, **self.card)


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
