"""PyTorch Selfie: self-supervised pretraining for image embedding (Trinh, Luong & Le, 2019)."""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import BlurPool2d, LayerNorm2d, Mlp
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_selfie import SelfieConfig
from .losses import ImageContrastiveLoss, PatchSelectionLoss, candidate_hits


@dataclass
class SelfieModelOutput(ModelOutput):
    """
    Output of [`SelfieModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_visible_patches, hidden_size)`):
            Output of the attention pooling network: u0's place first, then the visible patches in grid order.
            `None` for a model built without the attention pooling network.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            u, the summary of the visible patches (all patches when no mask is given).
        patch_embeddings (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`):
            h, the patch network's vector for every patch, hidden ones included, in row-major grid order.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Input of the attention pooling network and output of each of its layers.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SelfieForMaskedPatchPredictionOutput(ModelOutput):
    """
    Output of [`SelfieForMaskedPatchPrediction`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            The pretraining loss: `patch_selection_loss`, plus `config.image_contrastive_weight` times
            `image_contrastive_loss` where that term is on.
        logits (`torch.FloatTensor` of shape `(batch_size, num_masked_patches, num_masked_patches)`):
            `logits[b, i, j]` scores hidden patch j as the fill for hidden position i (both in grid order), from the
            summary of the visible patches; the right answer of row i is j = i.
        reverse_logits (`torch.FloatTensor` of shape `(batch_size, num_visible_patches, num_visible_patches)`):
            With `masking_strategy="split"` only: the other direction, visible patch j scored as the fill for visible
            position i from the summary of the hidden half.
        accuracy (`torch.FloatTensor` of shape `()`):
            Share of the positions filled in (hidden ones; visible ones too with the split objective) whose
            highest-scored candidate is their own patch (chance: 1 / the number of candidates).
        patch_selection_loss (`torch.FloatTensor` of shape `()`):
            Cross-entropy of choosing, for every position filled in, its own patch among the candidates: the hidden
            patches (and, with the split objective, the visible ones for the visible positions), averaged over
            positions.
        image_contrastive_loss (`torch.FloatTensor` of shape `()`):
            Where `config.image_contrastive_weight > 0`: the InfoNCE between the summaries of each image's two halves
            ([`ImageContrastiveLoss`]).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            The mask used, True where a patch was hidden: the one given, or the one drawn.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Input of the attention pooling network and output of each of its layers, over the visible patches.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reverse_logits: torch.FloatTensor | None = None
    accuracy: torch.FloatTensor | None = None
    patch_selection_loss: torch.FloatTensor | None = None
    image_contrastive_loss: torch.FloatTensor | None = None
    bool_masked_pos: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    # 32 groups as in Wu & He (2018); fewer where a (tiny) layer has fewer channels.
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels, **kwargs)


NORM_LAYERS = {"batchnorm": nn.BatchNorm2d, "layernorm": LayerNorm2d, "groupnorm": _group_norm}
# Every norm of the models (LayerNorm2d is a LayerNorm).
NORM_LAYER_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def create_resnet(config: SelfieConfig) -> nn.Module:
    """The full timm ResNet of `config` (fresh weights, never downloaded), without its classifier, with the stem and
    norm layers that the config says."""
    resnet = timm.create_model(
        config.backbone,
        num_classes=0,
        in_chans=config.num_channels,
        norm_layer=NORM_LAYERS[config.backbone_norm],
        **(config.backbone_kwargs or {}),
    )
    if config.stem == "cifar":
        stem_channels = resnet.feature_info[0]["num_chs"]
        resnet.conv1 = nn.Conv2d(config.num_channels, stem_channels, 3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return resnet


class ResNetSplit(NamedTuple):
    patch_network: nn.Module  # P: the stem and stages 1-3; its `forward_features` gives the stage-3 feature map
    layer4: nn.Module  # stage 4, named as timm names it
    layer4_channels: int


class SelfieBasicBlock(GradientCheckpointingLayer, BasicBlock):
    """timm's BasicBlock as a transformers checkpointing layer, for `activation_checkpointing_enable()`."""


class SelfieBottleneck(GradientCheckpointingLayer, Bottleneck):
    """timm's Bottleneck as a transformers checkpointing layer, for `activation_checkpointing_enable()`."""


# timm's residual blocks and the checkpointing layers they become in the Selfie models (the same weights and names).
CHECKPOINTING_BLOCKS = {BasicBlock: SelfieBasicBlock, Bottleneck: SelfieBottleneck}


def split_resnet(config: SelfieConfig) -> ResNetSplit:
    """One ResNet of `config`, cut after stage 3, its residual blocks made checkpointing layers."""
    resnet = create_resnet(config)
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            block.__class__ = CHECKPOINTING_BLOCKS[type(block)]
    layer4, layer4_channels = resnet.layer4, resnet.num_features
    resnet.prune_intermediate_layers(indices=[3])  # feature index 3 is stage 3: stage 4 goes
    resnet.num_features = resnet.feature_info[3]["num_chs"]  # timm before 1.0.31 leaves stage 4's width here
    return ResNetSplit(resnet, layer4, layer4_channels)


@contextmanager
def _running_statistics_kept(module: nn.Module):
    """The BatchNorm layers of `module` normalise as they would (with the batch's statistics in training mode) but
    leave their running statistics and batch count as they are."""
    norms = [
        norm
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training and norm.track_running_stats
    ]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    try:
        for norm in norms:
            norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def _checkpoint_updating_statistics_once(checkpoint_function, block: nn.Module, function, *args, **kwargs):
    """`checkpoint_function(function, *args, **kwargs)` for `function`, the forward of `block`. Checkpointing runs
    it twice: in the forward, and again in the backward to recompute its activations. The second run must not update
    the block's BatchNorm running statistics again, else every checkpointed step would move them twice as far as a
    step without checkpointing."""
    calls = 0

    def run(*inputs, **input_kwargs):
        nonlocal calls
        if torch.compiler.is_compiling():  # the compiled backward recomputes from the graph, not by calling this
            return function(*inputs, **input_kwargs)
        calls += 1
        if calls == 1:
            return function(*inputs, **input_kwargs)
        with _running_statistics_kept(block):
            return function(*inputs, **input_kwargs)

    return checkpoint_function(run, *args, **kwargs)


def patchify(pixel_values: torch.Tensor, patch_size: int, channels_last: bool = False) -> torch.Tensor:
    """Cut `(batch, channels, height, width)` images into `(batch * num_patches, channels, p, p)` patches, each
    image's patches in row-major grid order, laid out in memory as `channels_last` says."""
    batch_size, channels, height, width = pixel_values.shape
    rows, columns = height // patch_size, width // patch_size
    # Splitting height and width is a view in either input layout; gathering the patches is the one copy, and it
    # writes them in the layout that P's convolutions run in, so that they need no conversion of their own.
    patches = pixel_values.reshape(batch_size, channels, rows, patch_size, columns, patch_size)
    if channels_last:
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(
            batch_size * rows * columns, patch_size, patch_size, channels
        )
        return patches.permute(0, 3, 1, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size * rows * columns, channels, patch_size, patch_size)


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    num_masked_patches: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """A `(batch_size, num_patches)` mask hiding `num_masked_patches` positions of every row, drawn uniformly."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    hidden = noise.argsort(dim=1)[:, :num_masked_patches]
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, hidden, True)


def split_positions(bool_masked_pos: torch.BoolTensor, num_masked_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid indices of the visible and of the hidden patches of every image, each in increasing grid order."""
    # A stable sort on the mask puts the visible positions first and the hidden ones last, each in grid order.
    order = torch.sort(bool_masked_pos.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :-num_masked_patches], order[:, -num_masked_patches:]


def _gather_patches(vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`vectors[b, positions[b, k]]` for `(batch, num_patches, dim)` vectors and `(batch, k)` positions."""
    # `gather` rather than `take_along_dim`, whose broadcasting pins the batch size in `torch.export`.
    return torch.gather(vectors, 1, positions.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))


class SelfiePositionEmbeddings(nn.Module):
    """Learned embeddings of the patch grid: pos(r, c) = row_r + column_c (`"factorized"`) or one vector a cell."""

    def __init__(self, config: SelfieConfig):
        super().__init__()
        rows, columns = config.grid_size
        self.grid_size = (rows, columns)
        if config.position_embedding_type == "factorized":
            self.rows = nn.Parameter(torch.zeros(rows, config.hidden_size))
            self.columns = nn.Parameter(torch.zeros(columns, config.hidden_size))
        else:
            self.cells = nn.Parameter(torch.zeros(rows, columns, config.hidden_size))

    def forward(self, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The `(rows * columns, hidden_size)` table in row-major order, interpolated to `grid_size` if given (for
        feature maps that are finer than the patch grid)."""
        rows, columns = grid_size or self.grid_size
        if hasattr(self, "cells"):
            cells = self.cells
            if (rows, columns) != self.grid_size:
                cells = F.interpolate(cells.permute(2, 0, 1)[None], (rows, columns), mode="bilinear").squeeze(0)
                cells = cells.permute(1, 2, 0)
            return cells.flatten(0, 1)
        row_table, column_table = _resize_table(self.rows, rows), _resize_table(self.columns, columns)
        return (row_table[:, None] + column_table[None, :]).flatten(0, 1)


def _resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None], length, mode="linear").squeeze(0).T


class SelfieAttentionLayer(GradientCheckpointingLayer, Block):
    """One Transformer layer of A: timm's pre-norm ViT block, checkpointed under `activation_checkpointing_enable()`
    as transformers checkpoints its layers."""


class SelfieAttentionPooling(nn.Module):
    """A: Transformer layers over (u0, h_v1 + pos_v1, ...); the layer-normed output at u0's place is the summary u."""

    def __init__(self, config: SelfieConfig):
        super().__init__()
        self.summary_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(
            SelfieAttentionLayer(
                config.hidden_size,
                config.num_attention_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                proj_drop=config.hidden_dropout_prob,
                attn_drop=config.attention_probs_dropout_prob,
                norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, output_hidden_states: bool = False):
        hidden = torch.cat([self.summary_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        hidden_states = [hidden]
        for layer in self.layers:
            hidden = layer(hidden)
            hidden_states.append(hidden)
        return self.norm(hidden), tuple(hidden_states) if output_hidden_states else None


class SelfiePreTrainedModel(PreTrainedModel):
    config_class = SelfieConfig
    base_model_prefix = "selfie"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # `activation_checkpointing_enable()` checkpoints every residual block of the ResNet and every layer of the
    # attention pooling network: the model's `GradientCheckpointingLayer`s.
    supports_gradient_checkpointing = True
    # What `device_map="auto"` must keep on one device: a residual block adds its input to its branch's output, and
    # the attention pooling network joins u0 to the tokens.
    _no_split_modules = ["SelfieBasicBlock", "SelfieBottleneck", "SelfieAttentionPooling"]

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
        # The residual blocks hold BatchNorm layers, whose running statistics the recomputation must leave alone.
        for module in self.modules():
            if isinstance(module, (SelfieBasicBlock, SelfieBottleneck)):
                module._gradient_checkpointing_func = partial(
                    _checkpoint_updating_statistics_once, gradient_checkpointing_func, module
                )

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # The code saved alongside defines every Selfie class: name them all in `auto_map`, so that each Auto
            # class loads the checkpoint with `trust_remote_code=True`, whichever head was saved.
            self.config.auto_map = {
                "AutoConfig": f"configuration_selfie.{SelfieConfig.__name__}",
                **{auto_class: f"modeling_selfie.{model_class.__name__}" for model_class, auto_class in AUTO_CLASSES},
            }
        super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):  # as timm initialises its ResNets
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):  # the ECA attention of the ecaresnet backbones: PyTorch's init, as timm
            module.reset_parameters()  # its `init` calls are guarded like ours: loaded weights stay
        elif isinstance(module, BlurPool2d):  # the resnetblur backbones: a fixed filter, in no checkpoint
            coefficients = torch.tensor([math.comb(module.filt_size - 1, k) for k in range(module.filt_size)])
            blur = torch.outer(coefficients, coefficients) / 4 ** (module.filt_size - 1)
            init.copy_(module.filt, blur.expand_as(module.filt))
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NORM_LAYER_TYPES):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (SelfiePositionEmbeddings, SelfieAttentionPooling)):
            for parameter in module.parameters(recurse=False):
                init.trunc_normal_(parameter, std=std)

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        super().initialize_weights()
        # As timm: every residual branch starts as an identity, the scale of its last norm at zero (timm's own
        # `zero_init_last`). Not in `_init_weights`, which transformers does not call on modules without parameters
        # of their own, such as the blocks; the guard keeps every loaded weight as it is.
        for module in self.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                module.zero_init_last()


class SelfieModel(SelfiePreTrainedModel):
    """
    The Selfie encoder: the patch network P applied to every patch, position embeddings, and the attention pooling
    network A that summarises the visible patches into u.

    With `add_attention_pooling=False` (used by the plain-ResNet classifier) the model holds P alone and returns
    only `patch_embeddings`, P's own vectors (no projection to `hidden_size`). `patch_network` is P where the caller
    built it: the classifier keeps stage 4 of the same ResNet.

    A note on `backbone_norm="batchnorm"`: in training mode, BatchNorm normalises each layer over the whole batch of
    patches, visible and hidden alike, so the summary u depends slightly on the hidden patches' pixels. In eval mode,
    or with a per-sample norm (`"layernorm"`, `"groupnorm"`), it does not depend on them at all.
    """

    def __init__(
        self, config: SelfieConfig, add_attention_pooling: bool = True, patch_network: nn.Module | None = None
    ):
        super().__init__(config)
        self.patch_network = patch_network if patch_network is not None else split_resnet(config).patch_network
        patch_features = self.patch_network.num_features
        if add_attention_pooling and patch_features != config.hidden_size:
            self.patch_projection = nn.Linear(patch_features, config.hidden_size)  # into A's width
        else:
            self.patch_projection = nn.Identity()
        self.position_embeddings = SelfiePositionEmbeddings(config) if add_attention_pooling else None
        self.attention_pooling = SelfieAttentionPooling(config) if add_attention_pooling else None
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As [`~transformers.PreTrainedModel.from_pretrained`], but refusing a checkpoint that does not hold every
        weight of the model, such as a classifier with the `"resnet"` head (P and stage 4, no attention pooling
        network): the model is a feature extractor (`AutoModel`, the `image-feature-extraction` pipeline), and its
        missing weights would be drawn at random, other features at every load."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing = sorted(loading_info["missing_keys"])
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no weights for {len(missing)} of SelfieModel's tensors "
                f"({missing[0]!r}, ...), which would be random: a classifier with the 'resnet' head holds no "
                "attention pooling network. Load its patch network's feature maps with SelfieBackbone "
                "(AutoBackbone), or the classifier with AutoModelForImageClassification."
            )
        return (model, loading_info) if output_loading_info else model

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """P on whole images of any size: the `(batch, channels, height', width')` stage-3 feature map."""
        return self.patch_network.forward_features(pixel_values)

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """P's stem: convolution, norm, activation and max-pool (none with the CIFAR stem)."""
        network = self.patch_network
        return network.maxpool(network.act1(network.bn1(network.conv1(pixel_values))))

    def patch_stages(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """P's stages 1-3, which follow the stem."""
        return self.patch_network.layer1, self.patch_network.layer2, self.patch_network.layer3

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """h: P on every patch on its own, average-pooled and projected, `(batch, num_patches, hidden_size)`."""
        expected = self.config.image_height_width
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} images but the model's image_size is {expected}."
            )
        # All patches of all images go through P in one batch, in the memory format of P's weights (channels_last
        # after `model.to(memory_format=torch.channels_last)`).
        stem_weight = next(self.patch_network.parameters())
        channels_last = (
            stem_weight.is_contiguous(memory_format=torch.channels_last) and not stem_weight.is_contiguous()
        )
        patches = patchify(pixel_values, self.config.patch_size, channels_last)
        features = self.feature_map(patches).mean(dim=(2, 3))
        return self.patch_projection(features).view(pixel_values.shape[0], self.config.num_patches, -1)

    def summarize(
        self, patch_embeddings: torch.Tensor, positions: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> tuple:
        """A over the patches at `positions` (`(batch, k)` grid indices; every patch if None), each with its position
        embedding: the `(batch, 1 + k, hidden_size)` output, u first; and A's hidden states where asked for."""
        tokens = patch_embeddings + self.position_embeddings()
        if positions is not None:
            tokens = _gather_patches(tokens, positions)
        return self.attention_pooling(tokens, output_hidden_states)

    def summarize_feature_map(self, feature_map: torch.Tensor, output_hidden_states: bool = False) -> tuple:
        """u for whole images: A over every cell of P's feature map, with the position embeddings resized to it; and
        A's hidden states where asked for (else None)."""
        rows, columns = feature_map.shape[-2:]
        tokens = self.patch_projection(feature_map.flatten(2).transpose(1, 2))
        last_hidden_state, hidden_states = self.attention_pooling(
            tokens + self.position_embeddings((rows, columns)), output_hidden_states
        )
        return last_hidden_state[:, 0], hidden_states

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SelfieModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images of the config's `image_size`.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            True for the patches to hide from the attention pooling network, exactly `num_masked_patches` per
            image. With no mask, u summarises every patch.
        """
        if output_hidden_states is None:  # an explicit False wins over the config, as in transformers
            output_hidden_states = self.config.output_hidden_states
        patch_embeddings = self.embed_patches(pixel_values)
        if self.attention_pooling is None:
            return SelfieModelOutput(patch_embeddings=patch_embeddings)
        visible = None
        if bool_masked_pos is not None:
            self._check_mask(bool_masked_pos, pixel_values.shape[0])
            visible, _ = split_positions(bool_masked_pos, self.config.num_masked_patches)
        last_hidden_state, hidden_states = self.summarize(patch_embeddings, visible, output_hidden_states)
        return SelfieModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            patch_embeddings=patch_embeddings,
            hidden_states=hidden_states,
        )

    def _check_mask(self, bool_masked_pos: torch.Tensor, batch_size: int):
        expected_shape = (batch_size, self.config.num_patches)
        if bool_masked_pos.dtype != torch.bool or tuple(bool_masked_pos.shape) != expected_shape:
            raise ValueError(
                f"bool_masked_pos must be a bool tensor of shape {expected_shape}, "
                f"got {bool_masked_pos.dtype} of shape {tuple(bool_masked_pos.shape)}."
            )
        counts = bool_masked_pos.sum(dim=1)
        message = f"bool_masked_pos must hide exactly num_masked_patches={self.config.num_masked_patches} patches in every image"
        if bool_masked_pos.device.type == "cpu" and not torch.compiler.is_compiling():
            if not torch.all(counts == self.config.num_masked_patches):
                raise ValueError(f"{message}, got {sorted(set(counts.tolist()))}.")
        else:
            # On an accelerator (or in a compiled graph) the check runs on the device, in the step's stream: reading
            # the counts back would make the host wait for the device at every step. A bad mask fails the step.
            torch._assert_async(torch.all(counts == self.config.num_masked_patches), f"{message}.")


class SelfieImageContrastiveHead(nn.Module):
    """SplitMask's image-level term: the summaries of each image's two halves, each through a small projection head,
    must pick each other out of the summaries of the batch's other images ([`ImageContrastiveLoss`])."""

    def __init__(self, config: SelfieConfig):
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.contrastive_projection_size),
        )
        self.loss = ImageContrastiveLoss(config.contrastive_temperature)

    def forward(self, first_summary: torch.Tensor, second_summary: torch.Tensor) -> torch.Tensor:
        return self.loss(self.projection(first_summary), self.projection(second_summary))


class SelfieQueries(nn.Module):
    """The query v_i of every hidden position i, from the summary u and the position's embedding pos_i.

    `query_type="sum"` is the paper's v_i = u + pos_i. Its scores are linear in u: <u, h_j> is one bias per candidate
    patch, the same for every position, so the summary cannot say which hidden patch goes where, only how likely each
    is at all; the assignment rests on <pos_i, h_j>, what a patch alone says of its place in the image. `"mlp"` adds
    a pre-norm MLP (a Transformer layer's MLP sub-layer) in which the summary and the position interact:
    v_i = u + pos_i + MLP(LN(u + pos_i)).
    """

    def __init__(self, config: SelfieConfig):
        super().__init__()
        self.mlp = None
        if config.query_type == "mlp":
            self.mlp = nn.Sequential(
                nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
                Mlp(config.hidden_size, int(config.hidden_size * config.mlp_ratio)),
            )

    def forward(self, summary: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        """`(batch, dim)` summaries and `(batch, k, dim)` position embeddings -> `(batch, k, dim)` queries."""
        queries = summary.unsqueeze(1) + position_embeddings
        return queries if self.mlp is None else queries + self.mlp(queries)


class SelfieForMaskedPatchPrediction(SelfiePreTrainedModel):
    """
    Selfie pretraining: the summary u of the visible patches must pick, for every hidden position, its own patch out
    of the image's hidden patches ([`SelfieQueries`] make each position's query, [`PatchSelectionLoss`] scores the
    candidates against it). With `masking_strategy="split"` (SplitMask's split-and-match) the hidden half is
    summarised too, and its summary fills in the visible half the same way; with
    `image_contrastive_weight > 0` the two summaries of an image must also pick each other out of the batch
    ([`SelfieImageContrastiveHead`]).
    """

    def __init__(self, config: SelfieConfig):
        super().__init__(config)
        self.selfie = SelfieModel(config)
        # sqrt(hidden_size) by default: it keeps the scores' scale independent of the width, as in scaled dot-product
        # attention.
        temperature = config.score_temperature if config.score_temperature is not None else config.hidden_size**0.5
        self.queries = SelfieQueries(config)
        self.patch_selection_loss = PatchSelectionLoss(temperature)
        self.image_contrastive = SelfieImageContrastiveHead(config) if config.image_contrastive_weight > 0 else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> SelfieForMaskedPatchPredictionOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images of the config's `image_size`.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            True for the hidden patches, exactly `num_masked_patches` per image (with `masking_strategy="split"`,
            half the grid: the hidden half). When not given, a fresh mask is drawn for every image from torch's
            global random generator.
        """
        config = self.config
        if bool_masked_pos is None:
            bool_masked_pos = random_patch_mask(
                pixel_values.shape[0], config.num_patches, config.num_masked_patches, device=pixel_values.device
            )
        # A ModelOutput whatever `config.return_dict` says (which `can_return_tuple` applies to this model's output).
        outputs = self.selfie(
            pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=output_hidden_states, return_dict=True
        )
        visible, hidden = split_positions(bool_masked_pos, config.num_masked_patches)
        # Each summary with the positions it fills in: the visible patches' summary fills in the hidden positions;
        # under the split objective the hidden half's summary (A's second run; P ran once) fills in the visible ones.
        fills = [(outputs.pooler_output, hidden)]
        if config.masking_strategy == "split":
            fills.append((self.selfie.summarize(outputs.patch_embeddings, hidden)[0][:, 0], visible))
        selections = [self._fill_in(summary, outputs.patch_embeddings, positions) for summary, positions in fills]
        # The mean over every position filled in (the halves differ by one on an odd grid).
        patch_selection_loss = sum(loss * logits.shape[1] for loss, logits in selections) / sum(
            logits.shape[1] for _, logits in selections
        )
        loss, image_contrastive_loss = patch_selection_loss, None
        if self.image_contrastive is not None:
            image_contrastive_loss = self.image_contrastive(fills[0][0], fills[1][0])
            loss = loss + config.image_contrastive_weight * image_contrastive_loss
        logits = [logits for _, logits in selections]
        return SelfieForMaskedPatchPredictionOutput(
            loss=loss,
            logits=logits[0],
            reverse_logits=logits[1] if len(logits) > 1 else None,
            accuracy=candidate_hits(*(scores.detach() for scores in logits)).mean(),
            patch_selection_loss=patch_selection_loss,
            image_contrastive_loss=image_contrastive_loss,
            bool_masked_pos=bool_masked_pos,
            hidden_states=outputs.hidden_states,
        )

    def _fill_in(self, summary: torch.Tensor, patch_embeddings: torch.Tensor, positions: torch.Tensor) -> tuple:
        """The patch-selection loss and logits of `summary` filling in the patches at `positions`."""
        queries = self.queries(summary, self.selfie.position_embeddings()[positions])
        return self.patch_selection_loss(queries, _gather_patches(patch_embeddings, positions))


class SelfieForImageClassification(SelfiePreTrainedModel):
    """
    A classifier on whole images. With `classifier_head="resnet"`: P, then the ResNet's stage 4 (fresh), average
    pooling and a linear classifier: a plain ResNet whose first three stages can come from Selfie pretraining. With
    `"attention_pooling"`: no stage 4; the attention pooling network summarises P's feature map and a linear
    classifier reads the summary (the paper's "ResNet-36 + attention pooling").
    """

    def __init__(self, config: SelfieConfig):
        super().__init__(config)
        resnet = split_resnet(config)
        if config.classifier_head == "attention_pooling":
            self.selfie = SelfieModel(config, patch_network=resnet.patch_network)
            self.layer4 = None
            num_features = config.hidden_size
        else:
            self.selfie = SelfieModel(config, add_attention_pooling=False, patch_network=resnet.patch_network)
            self.layer4 = resnet.layer4
            num_features = resnet.layer4_channels
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Whole images (the model is fully convolutional up to its pooling, so any size works; the config's
            `image_size` is what it was trained on).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)`; the loss is the cross-entropy (or as `config.problem_type` says).
        output_hidden_states (`bool`, *optional*):
            Return `hidden_states`: P's stage-3 feature map, then stage 4's feature map (`"resnet"` head) or the
            input and each layer's output of the attention pooling network (`"attention_pooling"` head).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        feature_map = self.selfie.feature_map(pixel_values)
        if self.layer4 is None:
            pooled, head_states = self.selfie.summarize_feature_map(feature_map, output_hidden_states)
        else:
            last_feature_map = self.layer4(feature_map)
            pooled, head_states = last_feature_map.mean(dim=(2, 3)), (last_feature_map,)
        logits = self.classifier(self.dropout(pooled))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        hidden_states = (feature_map, *head_states) if output_hidden_states else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=hidden_states)


# Each model and the transformers Auto class that loads it (registered in `__init__.py`).
AUTO_CLASSES = (
    (SelfieModel, "AutoModel"),
    (SelfieForMaskedPatchPrediction, "AutoModelForPreTraining"),
    (SelfieForImageClassification, "AutoModelForImageClassification"),
)

__all__ = [
    "AUTO_CLASSES",
    "SelfieForImageClassification",
    "SelfieForMaskedPatchPrediction",
    "SelfieModel",
    "SelfiePreTrainedModel",
    "random_patch_mask",
]
