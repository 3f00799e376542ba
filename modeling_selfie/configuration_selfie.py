"""Selfie model configuration, and the architecture of the paper's three settings."""

import inspect
import math

from timm.models import is_model_in_modules
from timm.models.resnet import ResNet
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin


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
    [`SelfieForImageClassification`], [`SelfieBackbone`]): self-supervised pretraining for image embedding (Trinh,
    Luong & Le, 2019).

    An image of `image_size` is cut into a grid of non-overlapping `patch_size` x `patch_size` patches. The patch
    network P (the stem and the first three stages of a timm ResNet) turns every patch into one vector; the attention
    pooling network A (a few Transformer layers with a learned summary vector u0) summarises the visible patches into
    u; for every hidden position, u plus that position's embedding must pick the right patch out of the hidden
    patches of the same image.

    The defaults are the paper's ImageNet 224x224 setting; [`SelfieConfig.from_preset`] gives all three settings.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50"`):
            Name of a timm ResNet-family model (`resnet50`, `resnet18`, `resnet50d`, `wide_resnet50_2`, ...). P is
            its stem and its stages 1-3; the `"resnet"` classification head adds its stage 4.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, e.g. `{"layers": [1, 1, 1, 1], "channels": [8, 16, 32,
            64]}` for a tiny network in tests.
        backbone_norm (`str`, *optional*, defaults to `"batchnorm"`):
            Normalisation layers of the ResNet: `"batchnorm"`, `"layernorm"` (timm's `LayerNorm2d`, over the channels
            at every position) or `"groupnorm"` (32 groups, fewer where a layer has fewer channels). CPC v2 found that
            BatchNorm, whose training-mode statistics mix the patches of a batch, lets hidden patches leak into the
            context; the per-sample norms cannot.
        stem (`str`, *optional*, defaults to `"imagenet"`):
            `"imagenet"`: the backbone's own stem (ResNet-50: 7x7 stride-2 convolution and max-pool). `"cifar"`: one
            3x3 stride-1 convolution and no max-pool, for 32x32 images and 8x8 patches.
        num_channels (`int`, *optional*, defaults to 3):
            Number of channels of the input images.
        image_size (`int` or `list[int]`, *optional*, defaults to 224):
            Size of the input images, one number for square images or `[height, width]`.
        patch_size (`int`, *optional*, defaults to 32):
            Side of the square patches. It must divide the image height and width; the patch grid is
            `(height // patch_size, width // patch_size)`.
        masking_strategy (`str`, *optional*, defaults to `"random"`):
            The pretraining objective's mask. `"random"`: Selfie's, `num_masked_patches` positions hidden at random;
            the summary of the visible patches picks the hidden patches for the hidden positions. `"split"`:
            SplitMask's split-and-match (El-Nouby et al., 2021): the grid is split at random into two disjoint
            halves (the hidden one has `num_patches // 2` positions, the visible one the rest), and the patch
            selection runs in both directions: the visible half's summary picks the hidden half's patches, and the
            hidden half's summary picks the visible half's. P runs once on all patches; A runs once for each half.
        num_masked_patches (`int`, *optional*):
            Number of patches hidden in every image during pretraining: at least 2 (one distractor) and fewer than
            the number of patches. Defaults to a quarter of the grid (4 of 16, 12 of 49) with the `"random"`
            strategy; the paper's figure hides 3 of 9. The `"split"` strategy hides half: `num_patches // 2`.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the attention pooling network and of the vectors scored in the loss. Where it differs from
            the width of P's output (1024 for ResNet-50), a linear projection maps P's vectors to it. The paper
            leaves A's size open ("a few Transformer layers"); the defaults keep it small, about 7% of the
            arithmetic of a supervised ResNet-50 step on either grid (at width 1024 and 3 layers, A would cost more
            than the stage 4 that P leaves out), so that a pretraining step is cheaper than a supervised one.
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
            `"factorized"`: learned row and column embeddings, pos(r, c) = row_r + col_c (7 + 7 vectors on a 7x7
            grid, as in the paper). `"full"`: one learned vector per grid cell.
        query_type (`str`, *optional*, defaults to `"sum"`):
            How the query of hidden position i is made from the summary u and the position's embedding pos_i. `"sum"`:
            the paper's u + pos_i. Its scores <u + pos_i, h_j> are linear in u, so u adds one bias per candidate
            patch, the same for every position: the summary cannot say which hidden patch goes where, and the task
            rests on what each patch alone says of its place. `"mlp"`: u + pos_i plus a pre-norm MLP of it (width
            `mlp_ratio` x `hidden_size`), in which the summary and the position interact. Pretraining only. On the
            CPU-scaled CIFAR-10 network the MLP doubled the validation candidate accuracy (32.5 to 65% of 8) and lowered
            fine-tuning on 5% of the labels by 2 points (`docs/cifar10-cpu-ablation.md`).
        score_temperature (`float`, *optional*):
            The temperature of the patch-selection loss: the candidate scores <v_i, h_j> are divided by it. Defaults
            to `sqrt(hidden_size)`: raw dot products of 1024-d vectors diverged within a few steps in our
            experiments. `1.0` gives the raw scores.
        image_contrastive_weight (`float`, *optional*, defaults to 0.0):
            Weight of SplitMask's image-level InfoNCE term in the pretraining loss (which is the patch-selection loss
            plus this weight times the InfoNCE loss). The summaries of an image's two halves, through a small
            projection head, must pick each other out of the summaries of every image of the (global) batch. Needs
            `masking_strategy="split"`, the only strategy that summarises both halves; 0 leaves the term and its
            projection head out.
        contrastive_temperature (`float`, *optional*, defaults to 0.1):
            The InfoNCE temperature: the cosine similarities of the projected summaries are divided by it.
        contrastive_projection_size (`int`, *optional*, defaults to 256):
            Output width of the projection head (a linear layer of `hidden_size`, GELU, a linear layer to this size)
            that maps each summary to the vector the InfoNCE compares. Pretraining only: classifiers leave it out.
        classifier_head (`str`, *optional*, defaults to `"resnet"`):
            Head of [`SelfieForImageClassification`]: `"resnet"` (P on the full image, then stage 4, average pooling
            and a linear classifier: a plain ResNet) or `"attention_pooling"` (no stage 4: the attention pooling
            network summarises P's feature map of the full image, the paper's "ResNet-36 + attention pooling").
        classifier_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout before the linear classifier.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers, position embeddings and u0.
            Convolutions are initialised as timm initialises its ResNets.
        training_stages (`list[dict]`, *optional*):
            Where the weights came from, oldest stage first: provenance, not architecture. The training scripts append
            their own stage and the model cards show the chain; saved with every checkpoint, so that it travels with
            the weights. Each entry is a dict with a `"task"` (today `"timm_weights"`, `"pretraining"` or
            `"classification"`) and fields of its own; entries of other tasks or with other fields, written by a later
            version, are kept as they are. Defaults to no stages: fresh weights.
        out_features (`list[str]`, *optional*):
            The feature maps that [`SelfieBackbone`] returns, a subset of `stage_names` (`"stem"`, `"stage1"`,
            `"stage2"`, `"stage3"`, `"stage4"`) in that order; it and `out_indices` (their positions in
            `stage_names`) are kept in step, as in every transformers backbone config. Defaults to `["stage3"]`, P's
            feature map. `"stage4"` is stage 4 of the `"resnet"` classification head: the backbone builds it only
            when asked for, and refuses to load it from a checkpoint without stage-4 weights (a pretraining
            checkpoint, an `"attention_pooling"` classifier), where it would be random. The other models ignore both
            fields.
        out_indices (`list[int]`, *optional*):
            The same choice as `out_features`, as indices into `stage_names`; give either.

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
    training_stages: list[dict] | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, (list, tuple)):
            self.image_size = list(self.image_size)
        if self.training_stages is None:
            self.training_stages = []
        # The backbone fields: `stage_names` is fixed (a saved copy is ignored), `out_features` and `out_indices`
        # are aligned by BackboneConfigMixin after the other checks.
        kwargs.pop("stage_names", None)
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        super().__post_init__(**kwargs)
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
        self._check_training_stages()

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
                _fail("backbone_kwargs", kwargs, f"{key} must be a list of 4 positive ints, one a stage")

    def _check_training_stages(self):
        # Only the shape that every version writes: a later version's stages must load in this one.
        stages = self.training_stages
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            _fail("training_stages", stages, "must be a list of dicts")
        for index, stage in enumerate(stages):
            if not isinstance(stage.get("task"), str):
                _fail(f"training_stages[{index}]", stage, "must name its 'task'")

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
