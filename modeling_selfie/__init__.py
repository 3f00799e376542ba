"""Selfie (Trinh, Luong & Le, 2019) as a transformers model package.

Importing it registers the Selfie classes with the transformers Auto classes, and marks them so that
`save_pretrained` also writes their code: a saved model then loads with `trust_remote_code=True` where this
package is not installed.
"""

import transformers

from .backbone_selfie import SelfieBackbone
from .configuration_selfie import CLASSIFIER_HEADS, PRESETS, STAGE_NAMES, SelfieConfig
from .image_processing_selfie import preset_image_processor, to_rgb
from .losses import ImageContrastiveLoss, PatchSelectionLoss, candidate_hits
from .modeling_selfie import (
    AUTO_CLASSES,
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    SelfieModel,
    SelfiePreTrainedModel,
    random_patch_mask,
)


transformers.AutoConfig.register(SelfieConfig.model_type, SelfieConfig)
SelfieConfig.register_for_auto_class()
for model_class, auto_class in AUTO_CLASSES:
    getattr(transformers, auto_class).register(SelfieConfig, model_class)
    model_class.register_for_auto_class(auto_class)
# The backbone, for `AutoBackbone` and the dense-prediction models that build theirs from a `backbone_config`.
transformers.AutoBackbone.register(SelfieConfig, SelfieBackbone)
SelfieBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "CLASSIFIER_HEADS",
    "ImageContrastiveLoss",
    "PRESETS",
    "STAGE_NAMES",
    "PatchSelectionLoss",
    "SelfieBackbone",
    "SelfieConfig",
    "SelfieForImageClassification",
    "SelfieForMaskedPatchPrediction",
    "SelfieModel",
    "SelfiePreTrainedModel",
    "candidate_hits",
    "preset_image_processor",
    "random_patch_mask",
    "to_rgb",
]
