"""Selfie's ResNet as a transformers backbone: multi-scale feature maps for dense prediction (detection, segmentation)."""

import torch
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.utils.generic import can_return_tuple

from .configuration_selfie import SelfieConfig
from .modeling_selfie import SelfieModel, SelfiePreTrainedModel, split_resnet


class SelfieBackbone(BackboneMixin, SelfiePreTrainedModel):
    """
    The ResNet of a Selfie checkpoint as a transformers backbone ([`~transformers.AutoBackbone`]): P runs on whole
    images (not patch by patch) and returns the feature maps that `config.out_features` names, for a dense-prediction
    model built on a `backbone_config` (UperNet, DETR, ...).

    The stages, as `config.stage_names`:

    - `"stem"`: the stem's output, after the max-pool (stride 4; stride 1 with the CIFAR stem, which has none), as
      transformers' own ResNet backbone names it;
    - `"stage1"`, `"stage2"`, `"stage3"`: the stages of P; `"stage3"` is P's feature map,
      [`SelfieModel.feature_map`];
    - `"stage4"`: the ResNet's stage 4, which only a classifier with the `"resnet"` head has.

    The rule for stage 4: it is built only when `out_features` asks for it, and [`~SelfieBackbone.from_pretrained`]
    refuses to load it from a checkpoint that has no stage-4 weights (a pretraining checkpoint, a [`SelfieModel`],
    an `"attention_pooling"` classifier), where it would be random. A backbone built from a config alone
    (`AutoBackbone.from_config`, or inside a dense-prediction model) builds it fresh, like every other weight.

    The weights load from a pretraining or a classification checkpoint alike: the module names are the
    classifier's (`selfie.patch_network.*`, `layer4.*`), and the parts a backbone does not use (the attention pooling
    network, the classifier, stage 4 when not asked for) are left out without a warning.
    """

    has_attentions = False
    # The parts of the other Selfie checkpoints that a backbone does not use. Anchored at the start: a dense-prediction
    # model that holds the backbone gathers these patterns too, and must not drop its own keys by them.
    _keys_to_ignore_on_load_unexpected = [
        r"^(selfie\.)?(patch_projection|position_embeddings|attention_pooling)\.",  # a SelfieModel's have no prefix
        r"^classifier\.",
        r"^layer4\.",  # a classifier's stage 4, where `out_features` leaves it out (where not, the model expects it)
    ]

    def __init__(self, config: SelfieConfig):
        super().__init__(config)
        resnet = split_resnet(config)
        # Named as in the classifier, so that the keys of either checkpoint match.
        self.selfie = SelfieModel(config, add_attention_pooling=False, patch_network=resnet.patch_network)
        self.layer4 = resnet.layer4 if "stage4" in config.out_features else None
        # The channels of every stage, stage 4's included (timm's feature info: act1, layer1, ..., layer4).
        self.num_features = [info["num_chs"] for info in resnet.patch_network.feature_info]
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As [`~transformers.PreTrainedModel.from_pretrained`], but refusing `"stage4"` in `out_features` where
        the checkpoint has no stage-4 weights."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if model.layer4 is not None and any(key.startswith("layer4.") for key in loading_info["missing_keys"]):
            raise ValueError(
                f"{pretrained_model_name_or_path} has no stage-4 weights (only a classifier with the 'resnet' head "
                "has them): its 'stage4' would be random. Leave 'stage4' out of out_features (the patch network's "
                "stages are 'stem', 'stage1', 'stage2' and 'stage3')."
            )
        return (model, loading_info) if output_loading_info else model

    def _check_out_features(self):
        if "stage4" in self.out_features and self.layer4 is None:
            raise ValueError(
                "out_features has 'stage4' but this backbone was built without stage 4; build it with 'stage4' in "
                "config.out_features (from a classifier checkpoint with the 'resnet' head, or fresh)."
            )

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Whole images of any size.
        output_hidden_states (`bool`, *optional*):
            Also return `hidden_states`: the output of every stage the backbone has, in `stage_names` order, whether
            in `out_features` or not.

        Returns a [`~transformers.modeling_outputs.BackboneOutput`] whose `feature_maps` are those of
        `out_features`, with `self.channels` channels.
        """
        self._check_out_features()
        hidden_states = [self.selfie.stem(pixel_values)]
        stages = [*self.selfie.patch_stages(), *([self.layer4] if self.layer4 is not None else [])]
        for stage in stages:
            hidden_states.append(stage(hidden_states[-1]))
        feature_maps = tuple(hidden_states[self.stage_names.index(name)] for name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=tuple(hidden_states), attentions=None)


__all__ = ["SelfieBackbone"]
