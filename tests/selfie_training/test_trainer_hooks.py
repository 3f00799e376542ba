"""The private `Trainer` methods that `selfie_training/trainer_hooks.py` overrides or calls: if transformers renames
one or changes what it takes, these fail, naming it, before any resumed run goes wrong."""

import inspect

import pytest
import torch
from transformers import Trainer

from selfie_training.trainer_hooks import PRIVATE_TRAINER_METHODS
from tests.utils import pretrain


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_METHODS))
def test_the_private_trainer_methods_are_still_there_with_their_parameters(name):
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers' Trainer has no {name} any more: update selfie_training/trainer_hooks.py"
    parameters = tuple(inspect.signature(method).parameters)[1:]
    assert parameters == PRIVATE_TRAINER_METHODS[name], f"Trainer.{name} now takes {parameters}"


def test_every_checkpoint_holds_the_data_stream_state_of_its_last_trained_batch(tmp_path):
    """`_save_rng_state` still runs for every checkpoint, inside it: the data stream's state is saved beside
    Trainer's own random states."""
    pretrain(tmp_path, "--max_steps", "2", "--save_steps", "1", "--per_device_train_batch_size", "4")
    states = []
    for step in (1, 2):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert (checkpoint / "rng_state.pth").is_file()
        states.append(torch.load(checkpoint / "data_rng_state.pth", weights_only=True))
    assert states[0] != states[1]  # each the state after its own batch (bytes, on the resident images' path)
