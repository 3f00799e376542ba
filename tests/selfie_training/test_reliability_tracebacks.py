"""Inputs that ended in a traceback or a misleading line (issue 45): each is refused in one line that names the
flag, field, file or Hub id at fault, before any work starts, or said as it is."""

import json

import pytest

from modeling_selfie import SelfieConfig
from selfie_training.runner import ModelArguments, build_config
from tests.utils import tiny_config


def test_every_config_field_is_settable_with_config_overrides():
    # Fields of every kind, each away from the preset's value: None defaults, lists, a dict, floats, strings.
    target = tiny_config(
        score_temperature=2.0,
        image_size=[32, 48],
        out_features=["stage2", "stage3"],
        position_embedding_type="full",
        output_hidden_states=True,
    ).to_dict()
    overrides = ",".join(f"{name}={json.dumps(target[name])}" for name in SelfieConfig.__annotations__)
    config = build_config(ModelArguments(config_overrides=overrides), "imagenet224").to_dict()
    assert {name: config[name] for name in SelfieConfig.__annotations__} == {
        name: target[name] for name in SelfieConfig.__annotations__
    }

    # transformers' own form: strings unquoted, true/false words; and a None field set back to None.
    config = build_config(
        ModelArguments(config_overrides="score_temperature=1.5,query_type=mlp,output_hidden_states=yes"), "cifar10"
    )
    assert (config.score_temperature, config.query_type, config.output_hidden_states) == (1.5, "mlp", True)
    assert build_config(ModelArguments(config_overrides="score_temperature=none"), "cifar10").score_temperature is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("num_patches=4", r"^--config_overrides 'num_patches=4': 'num_patches' is not a field of SelfieConfig: "),
        ("hidden_size", r"^--config_overrides 'hidden_size': 'hidden_size' is not of the form name=value\.$"),
        ("score_temperature=-1", r"^SelfieConfig\.score_temperature=-1 must be a positive number"),
        ("image_size=[32,48", r"^SelfieConfig\.image_size='\[32,48' must be a positive int or \[height, width\]\.$"),
    ],
)
def test_bad_config_overrides_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(ModelArguments(config_overrides=overrides), "cifar10")
