"""Selfie (Trinh, Luong & Le, 2019) as a transformers model package.

Importing it registers the Selfie classes with the transformers Auto classes, and marks them so that
`save_pretrained` also writes their code: a saved model then loads with `trust_remote_code=True` where this
package is not installed.
"""

import transformers

from .configuration_selfie import CLASSIFIER_HEADS, PRESETS, SelfieConfig, SelfiePreset, get_preset
from .modeling_selfie import (
    AUTO_CLASSES,
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
    SelfiePreTrainedModel,
    random_patch_mask,
)
from .timm_weights import load_timm_weights, save_timm_weights, timm_state_dict


transformers.AutoConfig.register(SelfieConfig.model_type, SelfieConfig)
SelfieConfig.register_for_auto_class()
for model_class, auto_class in AUTO_CLASSES:
    getattr(transformers, auto_class).register(SelfieConfig, model_class)
    model_class.register_for_auto_class(auto_class)

__all__ = [
    "CLASSIFIER_HEADS",
    "PRESETS",
    "SelfieConfig",
    "SelfieForImageClassification",
    "SelfieForMaskedPatchPrediction",
    "SelfieModel",
    "SelfiePreTrainedModel",
    "SelfiePreset",
    "get_preset",
    "load_timm_weights",
    "random_patch_mask",
    "save_timm_weights",
    "timm_state_dict",
]
