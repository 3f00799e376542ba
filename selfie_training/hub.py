"""The Hugging Face Hub in the scripts: which flags of a run name it, and, before any work, whether it can be reached.
Offline or unreachable, a run that would push to it is refused in one line, and a run that reads from it works from
the local cache at once: the libraries would otherwise retry every request for half a minute, then end in a
traceback."""

import logging
import os
from contextlib import contextmanager

import datasets
import httpx2
from huggingface_hub import constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id
from transformers import TrainingArguments

from .errors import UserError, first_line
from .timm_weights import TIMM_WEIGHTS


logger = logging.getLogger(__name__)

# What the Hub's clients raise where it cannot be reached or refuses a request: OSError covers huggingface_hub's HTTP
# errors and its OfflineModeIsEnabled (a ConnectionError); httpx2's are the connection failures it lets through.
HUB_ERRORS = (OSError, httpx2.HTTPError)
# The flags that take a Hub id as well as a local path.
HUB_FLAGS = ("model_name_or_path", "config_name", "image_processor_name", "dataset_name")
PROBE_TIMEOUT_S = 10.0

_offline_reason = None  # why this process works offline, once `check_hub` decided it must


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can be a repository on the Hub: an `owner/name` or bare `name` id (huggingface_hub's
    `validate_repo_id`) that is not a file or folder here. The scripts take a local path wherever they take a Hub id,
    so an existing path is read from disk; a path that is no id (absolute, `./x`, `a/b/c`) never names a
    repository."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub(arguments: tuple):
    """Before any work, for a script's parsed flags: a run that pushes needs a token and a Hub it can reach; a run
    that reads something from the Hub (a Hub id in `HUB_FLAGS`, timm's weights) and cannot reach it works offline,
    from the local cache, as with HF_HUB_OFFLINE=1."""
    training_args = next((args for args in arguments if isinstance(args, TrainingArguments)), None)
    pushes = training_args is not None and training_args.push_to_hub
    if pushes and not (training_args.hub_token or get_token()):
        raise UserError(
            f"--push_to_hub {push_repository(training_args)} needs a Hub token with write access: log in with "
            "`hf auth login`, or give --hub_token."
        )
    reads = [
        f"--{flag} {getattr(args, flag)}"
        for args in arguments
        for flag in HUB_FLAGS
        if is_hub_id(getattr(args, flag, None))
    ]
    reads += [
        f"--backbone_weights {TIMM_WEIGHTS}"
        for args in arguments
        if getattr(args, "backbone_weights", None) == TIMM_WEIGHTS
    ]
    if not (pushes or reads):
        return
    reason = unreachable_reason()
    if reason is None:
        return
    if pushes:
        raise UserError(
            f"--push_to_hub {push_repository(training_args)}: the Hub cannot be reached ({reason}). Drop "
            f"--push_to_hub, and upload the run once it can be: {_upload_command(training_args)}."
        )
    logger.warning("The Hub cannot be reached (%s): %s read from the local cache.", reason, ", ".join(reads))
    _work_offline(reason)


def push_repository(training_args: TrainingArguments) -> str:
    """The repository `Trainer.push_to_hub` pushes to: --hub_model_id, else the output folder's name."""
    return training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))


@contextmanager
def push_errors_in_one_line(training_args: TrainingArguments):
    """The Hub's errors while `Trainer` creates or pushes to the --push_to_hub repository (a refusal, or a Hub that
    became unreachable after `check_hub`), in one line naming the repository."""
    try:
        yield
    except HUB_ERRORS as error:
        raise UserError(
            f"--push_to_hub {push_repository(training_args)}: the Hub refused or could not be reached "
            f"({first_line(error)}). {training_args.output_dir} keeps what the run wrote: upload it once the Hub "
            f"takes it: {_upload_command(training_args)}."
        ) from error


def _upload_command(training_args: TrainingArguments) -> str:
    return f"`hf upload {push_repository(training_args)} {training_args.output_dir}`"


def unreachable_reason() -> str | None:
    """Why the Hub cannot be reached now (offline mode, or the failure of one request, made without the libraries'
    retries), or None where it can."""
    if _offline_reason is not None:
        return _offline_reason
    if constants.is_offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except HUB_ERRORS as error:
        return first_line(error)
    return None


def _work_offline(reason: str):
    """For the rest of the process, what HF_HUB_OFFLINE=1 does: huggingface_hub, transformers, timm and datasets read
    their caches and ask the Hub nothing."""
    global _offline_reason
    _offline_reason = reason
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
