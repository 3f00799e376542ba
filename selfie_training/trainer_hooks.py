"""Every private `Trainer` method that the Selfie trainer overrides or calls, in one place. transformers may change
them in any release: `tests/selfie_training/test_trainer_hooks.py` checks their signatures and that each still
runs, so that such a change fails loudly there rather than silently in a resumed run."""

import logging
import os

from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME

from .errors import UserError


logger = logging.getLogger(__name__)

# The private methods below and the parameters (beside `self`) that they are called with.
PRIVATE_TRAINER_METHODS = {
    "_save_rng_state": ("output_dir",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_scaler": ("checkpoint",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
}


class TrainerHooks(Trainer):
    """The hooks that public API does not offer: the data stream's state saved with the random states of each
    checkpoint (`save_data_stream`, which subclasses define), one-line errors for an optimizer or loss-scaler state
    that does not fit the run, and the weights of a finished run restored as `Trainer` restores them."""

    def save_data_stream(self, checkpoint: str):
        """Save the data pipeline's own random state into `checkpoint`: nothing here, the Selfie trainer's in its."""

    def _save_rng_state(self, output_dir: str):
        # Inside the checkpoint, before trainer_state.json, which Trainer writes last: a checkpoint that has it is whole.
        super()._save_rng_state(output_dir)
        self.save_data_stream(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as error:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
            raise UserError(
                f"{os.path.join(checkpoint, OPTIMIZER_NAME)} does not fit this run's optimizer ({error}; changed "
                "--train_norm_only, --pretrained_learning_rate, --layer_decay or --freeze_pretrained_steps?): give "
                "this run another --output_dir."
            ) from error

    def _load_scaler(self, checkpoint: str):
        # The loss scale of an --fp16 run means nothing to a run without one (bf16, fp32): Trainer would fail on it.
        if self.accelerator.scaler is None and os.path.isfile(os.path.join(checkpoint, SCALER_NAME)):
            logger.warning(
                "Ignoring %s: this run scales no losses (no --fp16).", os.path.join(checkpoint, SCALER_NAME)
            )
            return
        super()._load_scaler(checkpoint)

    def load_finished_run(self, checkpoint: str):
        """The weights of the run that `checkpoint` ended, as Trainer leaves them at the end of training: the best
        checkpoint's under --load_best_model_at_end."""
        self._load_from_checkpoint(checkpoint)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
