"""Selfie model configuration, and the architecture of the paper's three settings."""

import dataclasses
import difflib
import inspect
import logging
import math

from timm.models import is_model_in_modules
from timm.models.resnet import ResNet
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


logger = logging.getLogger(__name__)

STEMS = ("imagenet", "cifar")
BACKBONE_NORMS = ("batchnorm", "layernorm", "groupnorm")
POSITION_EMBEDDING_TYPES = ("factorized", "full")
CLASSIFIER_HEADS = ("resnet", "attention_pooling")
MASKING_STRATEGIES = ("random", "split")
QUERY_TYPES = ("sum", "mlp")
# The feature maps of [`SelfieBackbone`]: the stem, stages 1-3 (P) and stage 4 (the `"resnet"` classifier's).
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")
DEFAULT_OUT_FEATURES = ("stage3",)  # P's output, which every checkpoint has
# The arguments of timm's ResNet that the models set themselves, and from what; `backbone_kwargs` may give the others.
SET_BY_SELFIE = {"num_classes": "the model's head", "in_chans": "num_channels", "norm_layer": "backbone_norm"}
RESNET_ARGUMENTS = set(inspect.signature(ResNet.__init__).parameters) - {"self", *SET_BY_SELFIE}
# The architecture of the paper's three settings; the image processor of each is in `image_processing_selfie.py`.
# Each hides the default share of its grid (`num_masked_patches`): 4 of 16 patches, 12 of 49.
PRESETS = {
    "cifar10": {"image_size": 32, "patch_size": 8, "stem": "cifar"},
    "imagenet32": {"image_size": 32, "patch_size": 8, "stem": "cifar"},
    "imagenet224": {"image_size": 224, "patch_size": 32, "stem": "imagenet"},
}


class SelfieConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of the Selfie models ([`SelfieModel`], [`SelfieForMaskedPatchPrediction`],
    [`SelfieForImageClassification`], [`SelfieBackbone`]), after "Selfie: Self-supervised Pretraining for Image
    Embedding" (Trinh, Luong & Le, 2019, arXiv:1906.02940).

    An image is cut into a grid of non-overlapping patches. The patch network (the stem and the first three stages of
    a timm ResNet) turns every patch into one vector; the attention pooling network (a few Transformer layers and a
    learned summary token) summarises the visible patches into the summary vector; for every hidden position, the
    summary vector plus that position's embedding must pick the right patch out of the image's hidden patches.

    The defaults are the paper's ImageNet 224x224 setting; [`SelfieConfig.from_preset`] gives its three settings.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50"`):
            Name of the timm ResNet-family model whose stem and stages 1-3 are the patch network; the paper uses
            ResNet-50.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"channels": [16, 32, 64, 128]}` for a narrower
            network.
        backbone_norm (`str`, *optional*, defaults to `"batchnorm"`):
            Normalisation layers of the ResNet: `"batchnorm"` as in the paper, or the per-sample `"layernorm"` or
            `"groupnorm"`, with which hidden patches cannot reach the summary through batch statistics (CPC v2,
            Hénaff et al., 2020).
        stem (`str`, *optional*, defaults to `"imagenet"`):
            `"imagenet"`: the backbone's own stem; `"cifar"`: one 3x3 stride-1 convolution and no max-pool, for
            32x32 images.
        num_channels (`int`, *optional*, defaults to 3):
            Number of channels of the input images.
        image_size (`int` or `list[int]`, *optional*, defaults to 224):
            Size of the input images, one number for square images or `[height, width]`.
        patch_size (`int`, *optional*, defaults to 32):
            Side of the square patches, which must divide the image's sides; the paper uses 32 on 224x224 images (a
            7x7 grid) and 8 on 32x32 images (a 4x4 grid).
        masking_strategy (`str`, *optional*, defaults to `"random"`):
            `"random"`: the paper's objective, `num_masked_patches` positions hidden at random; `"split"`: SplitMask's
            (El-Nouby et al., 2021), half of the grid hidden and each half picking the other half's patches.
        num_masked_patches (`int`, *optional*):
            Number of patches hidden in every image, from 2 to one less than the grid; defaults to a quarter of the
            grid (4 of 16, 12 of 49; the paper's figure hides 3 of 9), and to half of it with `"split"`.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the attention pooling network and of the vectors scored in the loss (the patch vectors are
            projected to it); the paper leaves the network's size open ("a few Transformer layers").
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Number of Transformer layers in the attention pooling network.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of attention heads in each Transformer layer; must divide `hidden_size`.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Width of each Transformer layer's MLP, as a multiple of `hidden_size`.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the outputs of the attention and MLP sub-layers.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the attention pooling network's layer norms.
        position_embedding_type (`str`, *optional*, defaults to `"factorized"`):
            `"factorized"`: the paper's learned row and column embeddings, pos(r, c) = row_r + col_c; `"full"`: one
            learned vector per grid cell.
        query_type (`str`, *optional*, defaults to `"sum"`):
            The query of a hidden position: `"sum"`, the paper's summary vector plus position embedding, or `"mlp"`,
            that plus a pre-norm MLP of it, in which the summary and the position interact (pretraining only).
        score_temperature (`float`, *optional*):
            Divides the patch-selection scores; defaults to `sqrt(hidden_size)`, which keeps their scale independent
            of the width as in scaled dot-product attention, and `1.0` gives the paper's plain dot products.
        image_contrastive_weight (`float`, *optional*, defaults to 0.0):
            Weight of SplitMask's image-level InfoNCE term between the summaries of an image's two halves, added to
            the pretraining loss; needs `masking_strategy="split"`, and 0 leaves the term out.
        contrastive_temperature (`float`, *optional*, defaults to 0.1):
            The InfoNCE temperature, which divides the cosine similarities of the projected summaries.
        contrastive_projection_size (`int`, *optional*, defaults to 256):
            Output width of the InfoNCE's projection head (linear, GELU, linear), which classifiers leave out.
        classifier_head (`str`, *optional*, defaults to `"resnet"`):
            Head of [`SelfieForImageClassification`]: `"resnet"`, stage 4, pooling and a linear classifier (the
            paper's ResNet-50), or `"attention_pooling"`, the attention pooling network over the patch network's
            feature map (the paper's "ResNet-36 + attention pooling").
        classifier_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout before the linear classifier.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers, embeddings and the summary
            token; convolutions are initialised as timm initialises its ResNets.
        out_features (`list[str]`, *optional*):
            The feature maps that [`SelfieBackbone`] returns, in order, from `stage_names` (`"stem"`, `"stage1"` to
            `"stage4"`); defaults to `["stage3"]`, the patch network's output, and `"stage4"` needs a checkpoint of a
            `"resnet"` classifier.
        out_indices (`list[int]`, *optional*):
            The same choice as `out_features`, as indices into `stage_names`; give either.

    A config.json (or keyword arguments) may hold fields that this version does not know, a misspelling or a newer
    version's: they are kept, as transformers keeps them, so that they survive a load and a save, and named in a
    warning, with the field each may be a misspelling of. The training scripts refuse them: a run would ignore them
    and copy them into its own checkpoint.

    Example:

    ```python
    >>> from modeling_selfie import SelfieConfig, SelfieForMaskedPatchPrediction

    >>> config = SelfieConfig.from_preset("cifar10")  # 32x32 images, 8x8 patches, 4 of 16 hidden
    >>> model = SelfieForMaskedPatchPrediction(config)
    ```
    """

    model_type = "selfie"
    # What `Trainer` leaves out of the predictions it gathers in evaluation: only the logits are read from them.
    keys_to_ignore_at_inference = [
        "accuracy",
        "patch_selection_loss",
        "image_contrastive_loss",
        "bool_masked_pos",
        "hidden_states",
    ]

    backbone: str = "resnet50"
    backbone_kwargs: dict | None = None
    backbone_norm: str = "batchnorm"
    stem: str = "imagenet"
    num_channels: int = 3
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 32
    masking_strategy: str = "random"
    num_masked_patches: int | None = None
    hidden_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    mlp_ratio: float = 4.0
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-6
    position_embedding_type: str = "factorized"
    query_type: str = "sum"
    score_temperature: float | None = None
    image_contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_projection_size: int = 256
    classifier_head: str = "resnet"
    classifier_dropout_prob: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = list(self.image_size)
        # The backbone fields: `stage_names` is fixed (a saved copy is ignored), `out_features` and `out_indices`
        # are aligned by BackboneConfigMixin after the other checks.
        kwargs.pop("stage_names", None)
        # Where the weights came from is no architecture: the training scripts keep it in a file of their own beside
        # the weights, and read it from a checkpoint's config.json where an earlier version wrote it there.
        kwargs.pop("training_stages", None)
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        super().__post_init__(**kwargs)
        unknown = unknown_fields(self)
        if unknown:
            # Kept, as transformers keeps them: a newer version's fields survive a load and a save in this one.
            logger.warning(
                "SelfieConfig: %s, which this version of modeling_selfie keeps but does not read (a misspelling, or "
                "a field of a newer version).",
                describe_unknown_fields(unknown),
            )
        self._check_fields()
        if self.num_masked_patches is None:
            self.num_masked_patches = self._default_num_masked_patches()
        self._check_masking()
        self.stage_names = list(STAGE_NAMES)
        self._set_out_features(out_features, out_indices)

    @property
    def image_height_width(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return tuple(self.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Rows and columns of the patch grid."""
        height, width = self.image_height_width
        return height // self.patch_size, width // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "SelfieConfig":
        """The configuration of one of the paper's settings (`PRESETS`), with `kwargs` overriding its fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Selfie preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **kwargs})

    def _check_fields(self):
        if not isinstance(self.backbone, str) or not is_model_in_modules(self.backbone, ["resnet"]):
            _fail("backbone", self.backbone, "must name a timm ResNet-family model such as 'resnet50'")
        if self.backbone_kwargs is not None:
            self._check_backbone_kwargs()
        _check_choice("stem", self.stem, STEMS)
        _check_choice("backbone_norm", self.backbone_norm, BACKBONE_NORMS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("classifier_head", self.classifier_head, CLASSIFIER_HEADS)
        _check_choice("masking_strategy", self.masking_strategy, MASKING_STRATEGIES)
        _check_choice("query_type", self.query_type, QUERY_TYPES)
        for name in (
            "num_channels",
            "patch_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "contrastive_projection_size",
        ):
            _check_positive_int(name, getattr(self, name))
        size = self.image_size
        if not (
            is_positive_int(size) or (isinstance(size, list) and len(size) == 2 and all(map(is_positive_int, size)))
        ):
            _fail("image_size", size, "must be a positive int or [height, width]")
        if any(side % self.patch_size for side in self.image_height_width):
            _fail("patch_size", self.patch_size, f"must divide image_size {size}")
        if self.hidden_size % self.num_attention_heads:
            _fail("num_attention_heads", self.num_attention_heads, f"must divide hidden_size={self.hidden_size}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                _fail(name, value, "must be a probability in [0, 1)")
        for name in ("mlp_ratio", "layer_norm_eps", "initializer_range", "contrastive_temperature"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                _fail(name, value, "must be a positive number")
        if self.score_temperature is not None and (
            not is_number(self.score_temperature) or self.score_temperature <= 0
        ):
            _fail(
                "score_temperature", self.score_temperature, "must be a positive number, or None for sqrt(hidden_size)"
            )
        weight = self.image_contrastive_weight
        if not is_number(weight) or weight < 0:
            _fail("image_contrastive_weight", weight, "must be a number >= 0")
        if weight > 0 and self.masking_strategy != "split":
            _fail(
                "image_contrastive_weight",
                weight,
                "needs masking_strategy='split' (the InfoNCE compares the summaries of an image's two halves)",
            )

    def _set_out_features(self, out_features, out_indices):
        if out_features is None and out_indices is None:
            out_features = DEFAULT_OUT_FEATURES
        out_features = list(out_features) if isinstance(out_features, tuple) else out_features
        try:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        except ValueError as error:  # BackboneConfigMixin's checks, which name no config
            field, value = ("out_features", out_features) if out_features is not None else ("out_indices", out_indices)
            _fail(field, value, f"must name stages of {list(STAGE_NAMES)}, each once and in that order ({error})")

    def _check_backbone_kwargs(self):
        # timm takes its arguments unchecked: a bad one fails deep in the model's construction, or builds a ResNet
        # with fewer stages than P and stage 4 need.
        kwargs = self.backbone_kwargs
        if not isinstance(kwargs, dict):
            _fail("backbone_kwargs", kwargs, "must be a dict of timm.create_model arguments")
        for key in kwargs:
            if key in SET_BY_SELFIE:
                _fail("backbone_kwargs", kwargs, f"sets {key!r}, which Selfie sets from {SET_BY_SELFIE[key]}")
            if key not in RESNET_ARGUMENTS:
                _fail("backbone_kwargs", kwargs, f"has {key!r}, which is not an argument of timm's ResNet")
        for key in ("layers", "channels"):
            value = kwargs.get(key, [1, 1, 1, 1])  # where absent, the backbone's own, which fit
            if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(map(is_positive_int, value))):
                _fail("backbone_kwargs", kwargs, f"{key} must be a list of 4 positive ints, one per stage")

    def _default_num_masked_patches(self) -> int:
        if self.masking_strategy == "split":
            return self.num_patches // 2
        return max(2, round(self.num_patches / 4))

    def _check_masking(self):
        masked = self.num_masked_patches
        if self.masking_strategy == "split":
            # Each half is the other's context and candidates: at least 2 patches each.
            if self.num_patches < 4:
                _fail("masking_strategy", "split", f"needs a grid of at least 4 patches, not {self.num_patches}")
            if masked != self.num_patches // 2:
                _fail(
                    "num_masked_patches",
                    masked,
                    f"must be {self.num_patches // 2} (half the {self.num_patches} patches) with masking_strategy='split'",
                )
        if not is_positive_int(masked) or not 2 <= masked < self.num_patches:
            _fail(
                "num_masked_patches",
                masked,
                f"must be an int from 2 to {self.num_patches - 1} (the {self.grid_size[0]}x{self.grid_size[1]} grid "
                "less at least one visible patch)",
            )


def unknown_fields(config: SelfieConfig) -> list[str]:
    """The fields of `config` that this version of `SelfieConfig` does not know: the keys of its config.json (or
    keyword arguments) that transformers keeps as attributes, having no use of its own for them (it drops those it
    knows, such as generation settings). Misspelt fields, which nothing reads, or those of a newer version."""
    known = {field.name for field in dataclasses.fields(config)} | {"model_type", "auto_map", "stage_names"}
    return sorted(name for name in vars(config) if not name.startswith("_") and name not in known)


def describe_unknown_fields(names: list[str]) -> str:
    """`unknown fields 'masking_stratgy' (masking_strategy?)`: each with the field it may be a misspelling of."""
    fields = [field.name for field in dataclasses.fields(SelfieConfig)]
    described = []
    for name in names:
        match = difflib.get_close_matches(name, fields, n=1)
        described.append(f"{name!r} ({match[0]}?)" if match else repr(name))
    return f"unknown field{'s' if len(names) > 1 else ''} {', '.join(described)}"


def _fail(field: str, value, requirement: str):
    raise ValueError(f"SelfieConfig.{field}={value!r} {requirement}.")


def is_number(value) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(field: str, value):
    if not is_positive_int(value):
        _fail(field, value, "must be a positive int")


def _check_choice(field: str, value, choices: tuple[str, ...]):
    if value not in choices:
        _fail(field, value, f"must be one of {', '.join(map(repr, choices))}")
