import json

import pytest

from modeling_selfie import PRESETS, SelfieConfig, preset_image_processor
from tests.utils import tiny_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone", "vit_base_patch16_224"),
        ("backbone", "no_such_resnet"),
        ("backbone_kwargs", ["layers"]),
        ("stem", "tiny"),
        ("backbone_norm", "instancenorm"),
        ("position_embedding_type", "sinusoidal"),
        ("query_type", "concat"),
        ("classifier_head", "mlp"),
        ("num_channels", 0),
        ("patch_size", 0),
        ("patch_size", 5),
        ("patch_size", 8.0),
        ("image_size", -32),
        ("image_size", [32, 32, 32]),
        ("image_size", "32"),
        ("hidden_size", 0),
        ("num_hidden_layers", 0),
        ("num_attention_heads", 5),
        ("num_masked_patches", 1),
        ("num_masked_patches", 16),
        ("num_masked_patches", 40),
        ("num_masked_patches", True),
        ("hidden_dropout_prob", 1.0),
        ("attention_probs_dropout_prob", -0.1),
        ("classifier_dropout_prob", "0.1"),
        ("mlp_ratio", 0),
        ("layer_norm_eps", 0),
        ("initializer_range", -1.0),
        ("score_temperature", 0.0),
        ("score_temperature", float("nan")),
        ("mlp_ratio", float("inf")),
    ],
)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"^SelfieConfig\.{field}="):
        tiny_config(**{field: value})


def test_default_is_the_papers_imagenet_224_setting():
    config = SelfieConfig()
    assert (config.backbone, config.stem, config.image_size, config.patch_size) == ("resnet50", "imagenet", 224, 32)
    assert config.grid_size == (7, 7)
    assert config.num_masked_patches == 12  # a quarter of 49
    assert config.score_temperature is None  # the loss divides by sqrt(hidden_size)


def test_non_square_grid_and_default_mask_count():
    config = tiny_config(image_size=[32, 64], num_masked_patches=None)
    assert config.grid_size == (4, 8)
    assert config.num_patches == 32
    assert config.num_masked_patches == 8


def test_presets():
    cifar = SelfieConfig.from_preset("cifar10", num_labels=10)
    assert (cifar.image_size, cifar.patch_size, cifar.stem, cifar.num_masked_patches) == (32, 8, "cifar", 4)
    assert cifar.num_labels == 10
    imagenet = SelfieConfig.from_preset("imagenet224")
    assert (imagenet.grid_size, imagenet.stem, imagenet.num_masked_patches) == ((7, 7), "imagenet", 12)
    assert SelfieConfig.from_preset("imagenet32").grid_size == (4, 4)
    with pytest.raises(ValueError, match="Unknown Selfie preset 'cifar100'"):
        SelfieConfig.from_preset("cifar100")
    with pytest.raises(ValueError, match="Unknown Selfie preset 'cifar100'"):
        preset_image_processor("cifar100")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_image_processor_matches_its_config(name):
    processor = preset_image_processor(name)
    config = SelfieConfig.from_preset(name)
    assert processor.crop_size == {"height": config.image_size, "width": config.image_size}
    assert processor.size["shortest_edge"] >= config.image_size
    cifar = name == "cifar10"
    assert processor.image_mean[0] == pytest.approx(0.4914 if cifar else 0.485)


def test_json_round_trip(tmp_path):
    config = tiny_config(image_size=[32, 64], score_temperature=1.0, classifier_head="attention_pooling")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "selfie"
    reloaded = SelfieConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.grid_size == (4, 8)


def test_corrupt_saved_config_is_rejected_on_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"patch_size": 8', '"patch_size": 7'))
    with pytest.raises(ValueError, match=r"SelfieConfig\.patch_size=7 must divide image_size 32"):
        SelfieConfig.from_pretrained(tmp_path)


def test_unknown_fields_are_kept_and_named_in_a_warning(tmp_path, caplog):
    """A misspelt field does nothing: named, with the field it may mean. A newer version's field survives a load and
    a save; what earlier versions wrote (`training_stages`) and a plain save load without a word."""

    def load_warnings() -> tuple[SelfieConfig, list[str]]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="modeling_selfie.configuration_selfie"):
            config = SelfieConfig.from_pretrained(tmp_path)
        return config, [
            record.getMessage() for record in caplog.records if record.name == "modeling_selfie.configuration_selfie"
        ]

    tiny_config().save_pretrained(tmp_path)
    assert load_warnings()[1] == []

    path = tmp_path / "config.json"
    fields = json.loads(path.read_text())
    path.write_text(json.dumps({**fields, "training_stages": [{"task": "pretraining"}]}))
    assert load_warnings()[1] == []

    path.write_text(json.dumps({**fields, "masking_stratgy": "split", "jitter": 2}))
    config, warnings = load_warnings()
    assert warnings == [
        "SelfieConfig: unknown fields 'jitter', 'masking_stratgy' (masking_strategy?), which this version of "
        "modeling_selfie keeps but does not read (a misspelling, or a field of a newer version)."
    ]
    assert config.masking_strategy == "random" and config.jitter == 2
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["jitter"] == 2
