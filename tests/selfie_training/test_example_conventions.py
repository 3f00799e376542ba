"""The flags of the transformers examples (run_mae.py, run_image_classification.py) that a transformers user reaches
for: --model_revision, --token, --image_processor_name and --trust_remote_code. The Hub is a cache made here, read
offline: no test reaches the network."""

import json
import shutil

import datasets
import huggingface_hub
import pytest
import transformers

from selfie_training import data
from selfie_training.data import DataArguments, load_splits
from selfie_training.errors import UserError
from tests.utils import pretrain


COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def hub_cache(tmp_path, pretrained, monkeypatch):
    """An offline Hub cache holding `someone/selfie` at two revisions: `v1`, the tiny pretraining checkpoint, and
    `main`, a BERT config; and a record of the Hub reads (repository, revision, token)."""
    cache = tmp_path / "hub"
    repository = cache / "models--someone--selfie"
    for revision, commit in COMMITS.items():
        (repository / "refs").mkdir(parents=True, exist_ok=True)
        (repository / "refs" / revision).write_text(commit)
        snapshot = repository / "snapshots" / commit
        if revision == "v1":
            shutil.copytree(pretrained, snapshot, ignore=shutil.ignore_patterns("checkpoint-*", "_*"))
        else:
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read offline (tests/conftest.py)
    reads, download = [], transformers.utils.hub.hf_hub_download

    def recorded_download(repo_id, filename, **kwargs):
        reads.append((repo_id, filename, kwargs.get("revision"), kwargs.get("token")))
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", recorded_download)
    return reads


def test_model_revision_and_token_reach_every_read_of_a_hub_checkpoint(tmp_path, hub_cache):
    with pytest.raises(UserError, match=r"^--model_name_or_path someone/selfie holds a 'bert' model"):
        pretrain(tmp_path / "main", "--model_name_or_path", "someone/selfie", "--max_steps", "1")

    # v1's config and weights load (main has neither a Selfie config nor weights); the files read one by one are
    # read at v1, with the token.
    hub_cache.clear()
    flags = ["--model_name_or_path", "someone/selfie", "--model_revision", "v1", "--token", "hf_test"]
    pretrain(tmp_path / "v1", *flags, "--max_steps", "1", "--max_train_samples", "16", "--max_eval_samples", "16")
    assert set(hub_cache) == {
        ("someone/selfie", name, "v1", "hf_test") for name in ("training_stages.json", "preprocessor_config.json")
    }


def test_token_reaches_a_hub_dataset(monkeypatch):
    calls, splits = [], {name: datasets.Dataset.from_dict({"image": [0, 1]}) for name in ("train", "validation")}
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: calls.append(kwargs) or splits)
    load_splits(DataArguments(dataset_name="someone/images"), token="hf_test")
    assert calls[0]["token"] == "hf_test"


def test_image_processor_name_replaces_the_checkpoints(tmp_path, pretrained):
    processor = json.loads((pretrained / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.25, 0.5, 0.75]
    (tmp_path / "processor.json").write_text(json.dumps(processor))
    flags = ["--model_name_or_path", str(pretrained), "--max_steps", "1", "--max_train_samples", "16"]
    pretrain(tmp_path / "run", *flags, "--image_processor_name", str(tmp_path / "processor.json"))
    assert json.loads((tmp_path / "run" / "preprocessor_config.json").read_text())["image_mean"] == [0.25, 0.5, 0.75]

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^--image_processor_name .*empty holds no preprocessor_config\.json\.$"):
        pretrain(tmp_path / "other", *flags, "--image_processor_name", str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--trust_remote_code", "True"],
            r"^--trust_remote_code: the scripts build this repository's Selfie classes and never run code from a "
            r"checkpoint or dataset, so there is none to trust: drop the flag\.$",
        ),
        (
            ["--model_revision", "v1"],
            r"^--model_revision v1 picks a revision of a Hub checkpoint, but no Hub id is given",
        ),
    ],
)
def test_flags_that_cannot_apply_are_refused_in_one_line(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        pretrain(tmp_path / "run", "--max_steps", "1", *flags)


def test_an_image_processor_on_an_unreachable_hub_says_so(tmp_path, hub_cache):
    with pytest.raises(
        UserError,
        match=r"^--image_processor_name someone/processor is not in the local cache, and the Hub cannot be reached "
        r"\(offline mode is on: HF_HUB_OFFLINE\)\.$",
    ):
        pretrain(tmp_path / "run", "--image_processor_name", "someone/processor", "--max_steps", "1")
