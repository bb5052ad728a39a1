"""The one settings tree shared by every `samkd` subcommand.

Values come from five places, later ones winning:

1. the defaults below;
2. a YAML file (`--config FILE`);
3. environment variables: `SAMKD_` prefix, nested keys joined with `__`
   (`SAMKD_TRAIN__LR=3e-4`, `SAMKD_TEACHERS='[{"name": "h", "model_type": "vit_h"}]'`);
4. `--set dotted.key=value` options (`--set train.lr=3e-4`, `--set teachers.0.weight=0.5`);
5. a subcommand's dedicated flags (`samkd train --steps 100`).

Every model forbids unknown keys, so a typo fails loudly; `format_validation_error` turns
pydantic's report into one line naming the dotted path and the closest valid key. Values that
contradict each other (e.g. `distillation.rkd.across_batch` with two images per micro-batch)
are refused at load time too, by the cross-field checks of `Settings`, with one line naming
every key involved.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SAMKD_"
ENV_NESTED_DELIMITER = "__"

# The SAM 2 family (`samkd.models.registry`): built from the optional sam2 package.
Sam2ModelType = Literal[
    "sam2.1_hiera_t",
    "sam2.1_hiera_s",
    "sam2.1_hiera_b+",
    "sam2.1_hiera_l",
    "sam2_hiera_t",
    "sam2_hiera_s",
    "sam2_hiera_b+",
    "sam2_hiera_l",
    "hiera_mini",
]
SAM2_MODEL_TYPES: tuple[str, ...] = get_args(Sam2ModelType)
ModelType = Literal["vit_b", "vit_l", "vit_h", "vit_t", "vit_mini", "vit_t_mini", Sam2ModelType]
FrameSetting = Literal["auto", "longest_side", "square"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
EvalPromptKind = Literal["box", "point", "points"]
ModelPart = Literal["image_encoder", "prompt_encoder", "mask_decoder"]


def model_frame(model_type: str, frame: str = "auto") -> Literal["longest_side", "square"]:
    """The input frame a model runs in (`samkd.models.frames`): `frame`, or with `auto` the
    one it was trained in: `square` for SAM 2, `longest_side` for the others."""
    if frame == "square" or (frame == "auto" and model_type in SAM2_MODEL_TYPES):
        return "square"
    return "longest_side"


FRAME_DESCRIPTION = (
    "input frame: auto (the model's own: square for SAM 2, which resizes the whole image to "
    "S x S; longest_side for SAM and MobileSAM, which resize the longest side to S and pad), "
    "longest_side, or square (SAM 2 only); see docs/sam2.md"
)


def _on_off(value: Any) -> Any:
    """YAML reads a bare on / off (as in `--set extract.fast_teacher=on`) as a boolean."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _device_name(value: str) -> str:
    """A device torch knows (checked here: a typo would otherwise fail after the set-up)."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ValueError("not a device: expected auto, cpu, cuda or cuda:N")
    return value


FastTeacher = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]
DEVICE_PATTERN = r"auto|cpu|meta|(cuda|xpu|mps)(:\d+)?"
Device = Annotated[str, AfterValidator(_device_name)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
AreaFraction = Annotated[float, Gt(0), Le(1)]


class SettingsError(ValueError):
    """A settings file, variable or option is invalid; the message is one line."""


class SettingsConflict(ValueError):
    """Values of several keys that contradict each other. The message names the keys (dotted,
    from the root); `keys` lets `format_validation_error` say where their values came from."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


class StrictModel(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # Infinite or NaN numbers (`--set train.lr=.inf`) pass `gt=0` but cannot train.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- data


class PromptSettings(StrictModel):
    """How training prompts are drawn from each ground-truth mask."""

    mode: Literal["box", "points", "mixed"] = Field(
        "box", description="box: the mask's box; points: points inside it; mixed: either"
    )
    box_jitter: NonNegativeFloat = Field(
        0.1, description="box corner noise as a fraction of the box side"
    )
    min_points: int = Field(1, ge=1, description="fewest positive points per object")
    max_points: int = Field(1, ge=1, description="most positive points per object")
    num_negative_points: int = Field(
        0,
        ge=0,
        description="negative points per object prompted by two or more positive points (one "
        "positive point stays a single click, which trains the multimask outputs); needs "
        "max_points >= 2",
    )
    max_objects: int = Field(16, ge=1, description="objects per image at most")
    unlabelled: Literal["none", "points", "teacher_masks"] = Field(
        "none",
        description="prompts for images without masks: none (encoder terms only), points "
        "(single points on a jittered grid), teacher_masks (boxes or points from the teacher's "
        "automatic masks, `samkd extract --pseudo-masks`); decoder terms match the teacher",
    )
    unlabelled_points: int = Field(
        8, ge=1, description="point prompts per unlabelled image with unlabelled: points"
    )

    @model_validator(mode="after")
    def _point_range(self) -> PromptSettings:
        if self.min_points > self.max_points:
            raise ValueError(f"min_points {self.min_points} exceeds max_points {self.max_points}")
        if self.num_negative_points and self.max_points == 1:
            raise ValueError(
                f"num_negative_points {self.num_negative_points} needs max_points >= 2: a prompt "
                "of one positive point is a single click (SAM's ambiguous prompt) and takes no "
                "negative points"
            )
        return self


class DataSettings(StrictModel):
    """Where the images (and masks) are, and how they are read."""

    train: Path | None = Field(None, description="training dataset folder")
    val: Path | None = Field(None, description="validation dataset folder")
    layout: Literal["auto", "folder", "coco", "sa1b", "dsb", "labels"] = Field(
        "auto",
        description="dataset layout; auto detects it (dsb: <id>/images + <id>/masks folders; "
        "labels: one instance label image per image)",
    )
    annotation_file: str | None = Field(
        None, description="COCO JSON name inside each dataset folder (auto when unset)"
    )
    image_size: int | None = Field(
        None, description="model input side in pixels, a multiple of 64 (default: the model's)"
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a bad image or mask stops the run, or is skipped and counted"
    )
    mask_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="a greyscale PNG mask pixel is foreground from this fraction of its format's "
        "range (0.5: >= 128 of 255, >= 32768 of 65535); 1-bit and 0/1 masks are read as they are",
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    prompts: PromptSettings = Field(PromptSettings(), description="how training prompts are drawn")

    @field_validator("image_size")
    @classmethod
    def _multiple_of_64(cls, value: int | None) -> int | None:
        if value is not None and (value <= 0 or value % 64):
            raise ValueError(f"must be a positive multiple of 64, got {value}")
        return value

    @field_validator("train", "val")
    @classmethod
    def _folder_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"folder '{value}' does not exist")
        return value


# --------------------------------------------------------------------------- models


class TapPair(StrictModel):
    """A student tap matched with a teacher tap, e.g. encoder.block.3 -> encoder.block.31."""

    student: str = Field(description="tap name on the student, e.g. encoder.qk.9")
    teacher: str = Field(description="tap name on the teacher, e.g. encoder.qk.31")


class TeacherSettings(StrictModel):
    """One teacher: a SAM model whose features the student learns from."""

    name: str = Field(description="short name used in feature files and loss names")
    model_type: ModelType = Field(
        description="registry name: vit_b, vit_l, vit_h, sam2.1_hiera_l, ... (samkd models)"
    )
    checkpoint: FilePath | None = Field(None, description="weights file (random init if unset)")
    weight: PositiveFloat = Field(1.0, description="this teacher's share of the distillation loss")
    frame: FrameSetting = Field("auto", description=FRAME_DESCRIPTION)
    taps: list[str] | None = Field(
        None, description="taps `samkd extract` stores for this teacher (default: extract.taps)"
    )
    encoder_pairs: list[TapPair] | None = Field(
        None, description="encoder-matching pairs for this teacher (default: the term's pairs)"
    )
    attention_pairs: list[TapPair] | None = Field(
        None, description="attention-matching pairs for this teacher (default: the term's pairs)"
    )

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        # Model types (sam2.1_hiera_b+) are valid names: `--teacher TYPE` names the teacher so.
        simple = value.replace("_", "").replace("-", "").replace(".", "").replace("+", "")
        if not value or value.startswith(".") or not simple.isalnum():
            raise ValueError(f"must be letters, digits, '-', '_', '.' or '+', got {value!r}")
        return value

    @model_validator(mode="after")
    def _frame_of_family(self) -> TeacherSettings:
        _check_frame(self.model_type, self.frame)
        return self


def _check_frame(model_type: str, frame: str) -> None:
    if frame == "square" and model_type not in SAM2_MODEL_TYPES:
        raise ValueError(
            f"frame square is SAM 2's; {model_type} runs in longest_side (or leave frame auto)"
        )


class LoraSettings(StrictModel):
    """Low-rank adapters (LoRA, through peft) on the student's linear layers: only the adapters
    and the parts in `train_parts` train; the run's student.pt has the adapters merged."""

    rank: int = Field(0, ge=0, description="rank r of each adapter (0: no LoRA)")
    alpha: int = Field(16, gt=0, description="the adapters' output scales by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    parts: list[Literal["image_encoder", "mask_decoder"]] = Field(
        ["image_encoder", "mask_decoder"], min_length=1, description="parts that get adapters"
    )
    layers: list[Literal["attention", "mlp"]] = Field(
        ["attention"],
        min_length=1,
        description="attention: the q/k/v and output projections; mlp: the transformer MLPs",
    )
    train_parts: list[ModelPart] = Field(
        [], description="parts trained in full beside the adapters (e.g. mask_decoder)"
    )


class StudentSettings(StrictModel):
    """The model being trained."""

    model_type: ModelType = Field("vit_t", description="registry name of the student")
    checkpoint: FilePath | None = Field(None, description="initial weights (random if unset)")
    frame: FrameSetting = Field(
        "auto",
        description="input frame of a SAM 2 student (trained and evaluated in it); "
        + FRAME_DESCRIPTION,
    )
    gradient_checkpointing: bool = Field(False, description="trade compute for memory")
    freeze_bn_stats: bool | None = Field(
        None, description="keep BatchNorm statistics fixed (default: on with a checkpoint)"
    )
    decoder_from: str | None = Field(
        None,
        description="teacher whose prompt encoder and mask decoder start the student "
        "(MobileSAM's recipe: the student inherits the teacher's decoder)",
    )
    lora: LoraSettings = Field(LoraSettings(), description="parameter-efficient fine-tuning")

    @model_validator(mode="after")
    def _frame_of_family(self) -> StudentSettings:
        _check_frame(self.model_type, self.frame)
        return self


# --------------------------------------------------------------------------- distillation


class EncoderTermSettings(StrictModel):
    """Encoder matching: lambda_mse * MSE + lambda_kl * tau^2 * KL over matched taps."""

    enabled: bool = Field(True, description="match student and teacher encoder features")
    weight: NonNegativeFloat = Field(1.0, description="lambda of the whole term")
    mse_weight: NonNegativeFloat = Field(
        1.0, description="weight of the MSE between adapted student and teacher features"
    )
    kl_weight: NonNegativeFloat = Field(
        0.0, description="weight of the tau^2-scaled softmax KL (0: the KL is not computed)"
    )
    temperature: PositiveFloat = Field(1.0, description="tau of the encoder KL's softmax")
    kl_axis: Literal["spatial", "channel"] = Field(
        "spatial", description="softmax over the positions of each channel, or over channels"
    )
    pairs: list[TapPair] | None = Field(None, description="matched taps (default per model)")


class DecoderTermSettings(StrictModel):
    """Decoder matching on the upscaled embedding and the mask logits."""

    enabled: bool = Field(
        False, description="match decoder outputs for the same prompts (teacher decoder runs)"
    )
    weight: NonNegativeFloat = Field(1.0, description="lambda of the whole term")
    mse_weight: NonNegativeFloat = Field(1.0, description="weight of the MSE on decoder.upscaled")
    cosine_weight: NonNegativeFloat = Field(
        1.0, description="weight of mean(1 - cosine over channels) on decoder.upscaled"
    )
    kl_weight: NonNegativeFloat = Field(
        1.0, description="weight of the tau^2-scaled per-pixel sigmoid KL on decoder.mask_logits"
    )
    temperature: PositiveFloat = Field(1.0, description="tau of the mask-logit KL")


class AttentionTermSettings(StrictModel):
    """Attention matching: KL between coarse head-averaged attention maps."""

    enabled: bool = Field(False, description="match attention maps of the paired qk taps")
    weight: NonNegativeFloat = Field(1.0, description="lambda of the attention KL term")
    grid_size: int = Field(
        16,
        ge=1,
        description="coarse map is grid_size^2 x grid_size^2; must equal extract.attention_grid "
        "when features are precomputed",
    )
    query_chunk: int = Field(
        1024, ge=1, description="queries per chunk when coarsening (bounds peak memory)"
    )
    pairs: list[TapPair] | None = Field(None, description="matched qk taps (default per model)")


class RKDTermSettings(StrictModel):
    """Relational KD (distance + angle) between patch embeddings."""

    enabled: bool = Field(False, description="match relations between patch embeddings")
    weight: NonNegativeFloat = Field(1.0, description="lambda of the whole term")
    distance_weight: NonNegativeFloat = Field(
        1.0, description="weight of the smooth-L1 loss on mean-normalised pairwise distances"
    )
    angle_weight: NonNegativeFloat = Field(
        2.0, description="weight of the smooth-L1 loss on angle cosines of patch triplets"
    )
    tap: str = Field("encoder.embed", description="feature whose patches are related")
    patches: Literal["grid", "sample"] = Field("grid", description="pooled grid or sampled")
    grid_size: int = Field(8, ge=2, description="pooled grid side (patches = grid_size^2)")
    num_samples: int = Field(64, ge=3, description="sampled positions per image")
    across_batch: bool = Field(
        False, description="relate the batch's images (each its concatenated patches) instead"
    )
    seed: int = Field(0, description="seed of the sampled positions (patches: sample)")


class DynamicLambdaSettings(StrictModel):
    """lambda_kd drops by `factor` when the validation metric plateaus (and, with
    `raise_factor`, rises again when it improves)."""

    enabled: bool = Field(
        False, description="lower lambda_kd on plateaus (needs data.val); off: it stays initial"
    )
    initial: NonNegativeFloat = Field(
        1.0, description="starting lambda_kd, the multiplier of the whole distillation loss"
    )
    factor: float = Field(
        0.5, gt=0, le=1, description="lambda_kd is multiplied by this on a plateau"
    )
    patience: int = Field(
        3, ge=0, description="evaluations without improvement tolerated; one more lowers lambda_kd"
    )
    threshold: NonNegativeFloat = Field(
        1e-3, description="absolute margin over the best metric that counts as an improvement"
    )
    cooldown: int = Field(
        0, ge=0, description="evaluations after a lowering during which plateaus are not counted"
    )
    min_lambda: NonNegativeFloat = Field(0.0, description="lambda_kd is never lowered below this")
    raise_factor: float | None = Field(
        None,
        gt=1,
        description="after an improving evaluation lambda_kd is multiplied by this, never above "
        "initial (null: it is only ever lowered)",
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="max: a higher metric is better; min: a lower one is; null: the metric's "
        "own, max for val/miou and min for val/kd_loss (setting the other one is an error)",
    )
    metric: Literal["val/miou", "val/kd_loss"] = Field(
        "val/miou",
        description="validation value watched: box mIoU or the distillation loss on the "
        "validation set (needs online teachers or val_features)",
    )

    @property
    def resolved_mode(self) -> Literal["max", "min"]:
        """`mode`, or the one `metric` implies when it is unset."""
        return self.mode or METRIC_MODES[self.metric]


# Which direction of each validation metric is better.
METRIC_MODES: dict[str, Literal["max", "min"]] = {"val/miou": "max", "val/kd_loss": "min"}


class DistillationSettings(StrictModel):
    """The distillation objective: one section per term."""

    use_precomputed_features: bool = Field(True, description="read teachers from the HDF5 file")
    features: Path | None = Field(None, description="HDF5 feature file written by extract")
    val_features: Path | None = Field(
        None, description="feature file of the validation set, for val/kd_loss when precomputed"
    )
    encoder: EncoderTermSettings = Field(
        EncoderTermSettings(), description="encoder feature matching"
    )
    decoder: DecoderTermSettings = Field(
        DecoderTermSettings(), description="decoder output matching"
    )
    attention: AttentionTermSettings = Field(
        AttentionTermSettings(), description="attention map matching"
    )
    rkd: RKDTermSettings = Field(
        RKDTermSettings(), description="relational KD between patch embeddings"
    )
    dynamic_lambda: DynamicLambdaSettings = Field(
        DynamicLambdaSettings(), description="schedule of lambda_kd"
    )
    fast_teachers: FastTeacher = Field(
        "auto",
        description="online teachers: fused SDPA attention with the relative position bias as "
        "mask (samkd.models.fast_attention); auto: on when train.device is CUDA, off on the CPU",
    )


# --------------------------------------------------------------------------- jobs


class LrScaleSettings(StrictModel):
    """Each student part's learning rate as a multiple of `train.lr` (the distillation
    adapters train at `train.lr`; `train.frozen_until` freezes a part)."""

    image_encoder: PositiveFloat = Field(
        1.0, description="learning rate of the image encoder, a multiple of train.lr"
    )
    prompt_encoder: PositiveFloat = Field(
        1.0, description="learning rate of the prompt encoder, a multiple of train.lr"
    )
    mask_decoder: PositiveFloat = Field(
        1.0, description="learning rate of the mask decoder, a multiple of train.lr"
    )


class TaskLossWeightSettings(StrictModel):
    """Weights of SAM's task terms: `task/total` is their weighted sum (SAM's: 20, 1, 1)."""

    focal: NonNegativeFloat = Field(20.0, description="weight of the focal loss (task/focal)")
    dice: NonNegativeFloat = Field(1.0, description="weight of the dice loss (task/dice)")
    iou: NonNegativeFloat = Field(
        1.0, description="weight of the predicted IoU's squared error (task/iou_mse)"
    )
    other_outputs: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of a single click's focal and dice given to its two multimask "
        "outputs other than the best (relaxed winner-takes-all: 0, SAM's rule, trains the best "
        "alone; above 0 keeps all three trained, for a decoder trained from scratch)",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> TaskLossWeightSettings:
        if not (self.focal or self.dice or self.iou):
            raise ValueError("every weight is 0; to train without it set train.task_loss: false")
        return self


class AugmentSettings(StrictModel):
    """Training-time augmentation, drawn per image and epoch from train.seed. brightness,
    contrast and flip keep stored teacher features valid; crop_scale, scale_jitter and rotate90
    change the image the teachers must see, so they need online teachers (--online). Geometric
    changes apply to the image, its masks and prompts (drawn from the transformed masks) before
    student and teachers see it; objects a crop leaves out are dropped (see
    `samkd.train.batches`)."""

    brightness: NonNegativeFloat = Field(0.0, description="student input only, normalised units")
    contrast: NonNegativeFloat = Field(0.0, description="student input only, relative")
    flip: float = Field(0.0, ge=0, le=1, description="horizontal flip probability")
    crop_scale: tuple[AreaFraction, AreaFraction] | None = Field(
        None,
        description="online teachers only: a random crop keeps a fraction of the image's area "
        "uniform in [min, max] (one number f: [f, 1]), at the image's aspect ratio, before "
        "SAM's resize (null or 1: off)",
    )
    scale_jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="online teachers only: SAM's input shows the image at a random scale in "
        "[1 - s, 1 + s] of the usual one (longest side = the input's side); zoomed in, a random "
        "window that fits is kept, zoomed out, the rest is padding (0: off)",
    )
    rotate90: bool = Field(
        False, description="online teachers only: turn by a random multiple of 90 degrees"
    )

    @field_validator("crop_scale", mode="before")
    @classmethod
    def _one_number_is_a_lower_bound(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (value, 1.0)
        return value

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"expected [min, max] with min <= max, got [{value[0]}, {value[1]}]")
        return value

    @property
    def geometric(self) -> list[str]:
        """The geometric augmentations that are on (they need online teachers)."""
        on = {
            "crop_scale": self.crop_scale not in (None, (1.0, 1.0)),
            "scale_jitter": self.scale_jitter > 0,
            "rotate90": self.rotate90,
        }
        return [name for name, enabled in on.items() if enabled]


class TrainSettings(StrictModel):
    """The optimisation loop."""

    output_dir: Path = Field(Path("runs/train"), description="run folder")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(2, ge=1, description="global batch size")
    grad_accumulation: int = Field(
        1, ge=1, description="micro-batches per step; the per-process batch must divide by it"
    )
    lr: PositiveFloat = Field(
        1e-4, description="peak AdamW learning rate (after warmup, cosine decay to 0)"
    )
    weight_decay: NonNegativeFloat = Field(
        0.01, description="AdamW weight decay of matrices and convolutions (not biases, norms)"
    )
    lr_scale: LrScaleSettings = Field(
        LrScaleSettings(), description="per-part multiples of lr (the same schedule for all)"
    )
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="layer-wise lr decay in the image encoder: with n blocks, block i trains at "
        "lr_scale.image_encoder x layer_decay^(n + 1 - i), the patch embedding at ^(n + 1), the "
        "neck undecayed (1: off)",
    )
    warmup_steps: int = Field(50, ge=0, description="steps of linear warmup from 0 to lr")
    grad_clip: NonNegativeFloat = Field(1.0, description="max gradient norm; 0 disables")
    precision: Precision = Field("auto", description="auto: bf16 on CUDA, fp32 on the CPU")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    compile: bool = Field(False, description="wrap the training step in torch.compile")
    channels_last: bool = Field(
        False, description="put the student's image encoder in channels_last memory format"
    )
    seed: int = Field(0, description="seed of initialisation, batch order, prompts, augmentation")
    val_every: int = Field(
        200, ge=1, description="steps between validations (and at the end); needs data.val"
    )
    checkpoint_every: int = Field(
        500, ge=1, description="steps between saves of checkpoints/last.pt (and at the end)"
    )
    early_stop_patience: int | None = Field(
        None,
        ge=1,
        description="stop after this many validations without a better val/miou (null: never)",
    )
    max_nonfinite_steps: int = Field(
        5,
        ge=1,
        description="consecutive steps skipped for a non-finite loss or gradients that abort "
        "the run (checked at the next logging, validation or checkpoint step)",
    )
    task_loss: bool = Field(
        True, description="add SAM's mask loss (focal, dice, IoU) when the data has masks"
    )
    task_loss_weights: TaskLossWeightSettings = Field(
        TaskLossWeightSettings(), description="weights of the focal, dice and IoU terms"
    )
    frozen_until: dict[ModelPart, Annotated[int, Ge(-1)]] = Field(
        default_factory=dict,
        description="part -> first step it trains (-1: frozen for the whole run)",
    )
    prompt_iters: int = Field(
        1,
        ge=1,
        description="decoder passes per object: each after the first adds one corrective click "
        "and may feed the previous mask back (1: the sampled prompt only)",
    )
    mask_feedback_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="chance, per object and iteration after the first, that the previous "
        "low-resolution logits are given as the mask prompt",
    )
    click_target: Literal["gt", "teacher"] = Field(
        "gt",
        description="mask the corrective clicks correct towards: the ground truth, or the first "
        "teacher's current mask (needs distillation.decoder)",
    )
    click_mode: Literal["farthest", "random"] = Field(
        "farthest",
        description="a click goes to the error pixel farthest from the region's border, or to "
        "a seeded random pixel of it",
    )
    pseudo_mask_weight: NonNegativeFloat = Field(
        0.0,
        description="weight of SAM's task loss on teacher masks of unlabelled images "
        "(data.prompts.unlabelled: teacher_masks; ground truth weighs 1; 0: decoder terms only)",
    )
    augment: AugmentSettings = Field(AugmentSettings(), description="training-time augmentation")


class MaskGeneratorSettings(StrictModel):
    """Options of segment-anything's `SamAutomaticMaskGenerator` (named as it names them): a
    grid of one-point prompts, masks kept by predicted IoU and stability, then box NMS."""

    points_per_side: int = Field(
        32, ge=1, description="side of the point grid: points_per_side² one-point prompts per image"
    )
    points_per_batch: int = Field(64, ge=1, description="point prompts decoded at once")
    pred_iou_thresh: float = Field(
        0.88, ge=0, description="keep masks whose predicted IoU exceeds this (0: keep all)"
    )
    stability_score_thresh: float = Field(
        0.95, ge=0, le=1, description="keep masks whose stability score reaches this (0: keep all)"
    )
    stability_score_offset: float = Field(
        1.0, ge=0, description="logit offset of the two thresholds the stability score compares"
    )
    box_nms_thresh: float = Field(
        0.7, gt=0, le=1, description="box IoU above which the lower-IoU mask of a pair is dropped"
    )


class PseudoMaskSettings(MaskGeneratorSettings):
    """One teacher's automatic masks of each image, stored with its features (segment-anything's
    `SamAutomaticMaskGenerator` on the stored embedding, without crops or small-region removal)."""

    enabled: bool = Field(
        False, description="store pseudo-masks in the feature file (`samkd extract --pseudo-masks`)"
    )
    teacher: str | None = Field(
        None, description="name of the teacher whose masks are stored (default: the first)"
    )
    points_per_side: int = Field(
        16, ge=1, description="side of the point grid: points_per_side² one-point prompts per image"
    )
    max_masks: int = Field(
        32, ge=1, description="masks stored per image at most, highest predicted IoU first"
    )


class ExtractSettings(StrictModel):
    """Writing teacher features to an HDF5 file."""

    output: Path = Field(Path("features.h5"), description="feature file to write")
    taps: list[str] = Field(
        default_factory=lambda: ["encoder.embed"],
        description="encoder taps stored per teacher: encoder.embed, encoder.block.<i>, "
        "encoder.qk.<i>, and a SAM 2 teacher's encoder.high_res.0 / .1",
    )
    high_res: bool = Field(
        False,
        description="also store every SAM 2 teacher's two high-resolution maps "
        "(encoder.high_res.0/1, 3x the bytes of encoder.embed), which its decoder needs from the "
        "file: decoder terms, the prompt loop, unlabelled teacher_masks, eval agreement",
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of taps")
    compression: Literal["none", "gzip", "lzf"] = Field(
        "none", description="HDF5 compression filter of the tap datasets"
    )
    allow_overflow: bool = Field(False, description="store values beyond float16 range anyway")
    allow_nonfinite: bool = Field(False, description="store NaN / Inf feature values anyway")
    shard_size: int = Field(
        64, ge=1, description="images per shard file; a killed run redoes at most one shard"
    )
    join: Literal["copy", "virtual"] = Field(
        "copy", description="join shards by copying chunks, or as virtual datasets over them"
    )
    batch_size: int = Field(4, ge=1, description="images per teacher forward pass")
    attention_grid: int = Field(16, ge=1, description="coarse attention grid side")
    precision: Precision = Field(
        "auto", description="teacher autocast dtype; auto: bf16 on CUDA, fp32 on the CPU"
    )
    device: Device = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    fast_teacher: FastTeacher = Field(
        "auto",
        description="fused SDPA attention with the relative position bias as mask "
        "(samkd.models.fast_attention); auto: on for CUDA, off on the CPU",
    )
    compile: bool = Field(
        False, description="with the fast teacher, torch.compile its attention and MLPs"
    )
    pseudo_masks: PseudoMaskSettings = Field(
        PseudoMaskSettings(), description="teacher automatic masks stored per image"
    )


class AmgSettings(MaskGeneratorSettings):
    """Automatic mask generation scored against every ground-truth object (`samkd eval --amg`):
    segment-anything's `SamAutomaticMaskGenerator` with its defaults, on each image through the
    model's own image encoder."""

    enabled: bool = Field(
        False, description="also generate every image's automatic masks and score them (--amg)"
    )
    crop_n_layers: int = Field(
        0, ge=0, description="layers of image crops also run (layer i: (2^i)² crops); 0: none"
    )
    crop_nms_thresh: float = Field(
        0.7,
        gt=0,
        le=1,
        description="box IoU above which two crops' masks are one (the smaller crop's is kept)",
    )
    crop_overlap_ratio: float = Field(
        512 / 1500, ge=0, lt=1, description="overlap of neighbouring crops, a fraction of the side"
    )
    crop_n_points_downscale_factor: int = Field(
        1, ge=1, description="crop layer i's grid has points_per_side / factor^i points per side"
    )
    min_mask_region_area: int = Field(
        0,
        ge=0,
        description="remove holes and islands below this many pixels (needs OpenCV); 0: off",
    )

    @model_validator(mode="after")
    def _grid_in_every_layer(self) -> AmgSettings:
        scale = self.crop_n_points_downscale_factor**self.crop_n_layers
        if self.points_per_side < scale:
            raise ValueError(
                f"points_per_side {self.points_per_side} leaves no points in crop layer "
                f"{self.crop_n_layers} (crop_n_points_downscale_factor "
                f"{self.crop_n_points_downscale_factor}): expected at least {scale}"
            )
        return self


class EvalSettings(StrictModel):
    """Mask quality and speed measurement."""

    prompts: list[EvalPromptKind] = Field(
        default_factory=lambda: list[EvalPromptKind](["box", "point"]),
        description="box: the mask's box; point: its centre point; points: k corrective clicks",
    )
    num_points: int = Field(3, ge=1, description="k for the points prompt")
    multimask: bool = Field(
        True, description="also report the best of the 3 multimask outputs (oracle mIoU)"
    )
    speed: bool = Field(
        True, description="time the encoder (latency, throughput) and the decoder (latency per box)"
    )
    warmup: int = Field(2, ge=0, description="untimed calls before each timing")
    repeats: int = Field(10, ge=1, description="timed calls per latency (median and p90)")
    batch_size: int = Field(
        1, ge=1, description="encoder batch of the throughput timing (latency uses batch 1)"
    )
    device: Device = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    seed: int = Field(0, description="torch seed (e.g. random weights when no checkpoint is set)")
    overlay_images: int = Field(
        8,
        ge=1,
        description="images `--overlays` draws at most, one PNG each (the first with objects)",
    )
    amg: AmgSettings = Field(
        AmgSettings(), description="automatic mask generation (`samkd eval --amg`)"
    )


class LoggingSettings(StrictModel):
    """What is written where."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="lowest level of log messages printed to stderr"
    )
    log_every: int = Field(10, ge=1, description="steps between metric records")
    tensorboard: bool = Field(
        True, description="also write TensorBoard events to <run>/tensorboard (if installed)"
    )


class ExportSettings(StrictModel):
    """ONNX export (`samkd export`) and its parity check against PyTorch."""

    output: Path = Field(
        Path("onnx"), description="folder for image_encoder.onnx, decoder.onnx and parity.json"
    )
    opset: int = Field(17, ge=17, description="ONNX opset of both files")
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8: also write image_encoder.int8.onnx and decoder.int8.onnx, weights "
        "quantised by onnxruntime's dynamic quantisation (reported, never refused)",
    )
    return_single_mask: bool = Field(
        False,
        description="decoder.onnx returns only the mask segment-anything's ONNX example picks "
        "(its --return-single-mask) instead of all four; eval --onnx needs all four",
    )
    parity_images: int = Field(
        4, ge=1, le=64, description="images of --data (or generated shapes) the parity check runs"
    )
    embedding_atol: NonNegativeFloat = Field(
        1e-3, description="largest accepted |ONNX - PyTorch| of an fp32 image embedding value"
    )
    mask_logits_atol: NonNegativeFloat = Field(
        1e-2,
        description="largest accepted |ONNX - PyTorch| of an fp32 low-res mask logit (box "
        "prompts, both decoders given the PyTorch embedding)",
    )
    miou_atol: NonNegativeFloat = Field(
        0.005, description="largest accepted |ONNX - PyTorch| of the fp32 box-prompt mIoU"
    )


class Settings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    data: DataSettings = Field(DataSettings(), description="datasets and prompt sampling")
    teachers: list[TeacherSettings] = Field(
        default_factory=list,
        description="SAM models the student learns from (extract stores their features)",
    )
    student: StudentSettings = Field(StudentSettings(), description="the model being trained")
    distillation: DistillationSettings = Field(
        DistillationSettings(), description="the distillation objective"
    )
    train: TrainSettings = Field(TrainSettings(), description="the training loop")
    extract: ExtractSettings = Field(ExtractSettings(), description="teacher feature extraction")
    eval: EvalSettings = Field(EvalSettings(), description="mask quality and speed measurement")
    export: ExportSettings = Field(ExportSettings(), description="ONNX export and its parity check")
    logging: LoggingSettings = Field(LoggingSettings(), description="log level and metric outputs")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` merges file, environment and options itself, so that `--set`
        # can address list items; the model only validates what it is given.
        return (init_settings,)

    # Cross-field checks: settings that contradict each other, whichever subcommand reads
    # them. What needs the run itself (world size, the devices found, a feature file's
    # contents) is checked by the jobs; see also `check_micro_batch`.

    @model_validator(mode="after")
    def _teachers_consistent(self) -> Settings:
        names = [teacher.name for teacher in self.teachers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsConflict(
                f"teachers: names must be unique, '{duplicates[0]}' is repeated", "teachers"
            )
        source = self.student.decoder_from
        if source is not None and source not in names:
            expected = f"expected one of: {', '.join(names)}" if names else "teachers is empty"
            raise SettingsConflict(
                f"student.decoder_from '{source}' names no teacher; {expected}",
                "student.decoder_from",
                "teachers",
            )
        if source is not None and self.teachers[names.index(source)].model_type in SAM2_MODEL_TYPES:
            index = names.index(source)
            raise SettingsConflict(
                f"student.decoder_from '{source}' is a SAM 2 teacher "
                f"({self.teachers[index].model_type}), whose mask decoder (with high-resolution "
                "maps and an object score) is not the student's SAM decoder; leave decoder_from "
                "unset and let decoder terms teach the student's own decoder",
                "student.decoder_from",
                f"teachers.{index}.model_type",
            )
        if source is not None and not self.distillation.use_precomputed_features:
            # Online, the decoder comes from the checkpoint (a feature file stores its own).
            index = names.index(source)
            if self.teachers[index].checkpoint is None:
                raise SettingsConflict(
                    f"student.decoder_from '{source}' with online teachers needs "
                    f"teachers.{index}.checkpoint: a random teacher has no decoder to inherit",
                    "student.decoder_from",
                    f"teachers.{index}.checkpoint",
                    "distillation.use_precomputed_features",
                )
        pseudo = self.extract.pseudo_masks
        if pseudo.teacher is not None and pseudo.teacher not in names:
            expected = f"expected one of: {', '.join(names)}" if names else "teachers is empty"
            raise SettingsConflict(
                f"extract.pseudo_masks.teacher '{pseudo.teacher}' names no teacher; {expected}",
                "extract.pseudo_masks.teacher",
                "teachers",
            )
        if pseudo.enabled and self.teachers:
            index = names.index(pseudo.teacher) if pseudo.teacher else 0
            taps = self.teachers[index].taps or self.extract.taps
            if "encoder.embed" not in taps:
                raise SettingsConflict(
                    f"extract.pseudo_masks.enabled needs teacher '{names[index]}' to store "
                    f"encoder.embed, the masks' input; its taps are {taps}",
                    "extract.pseudo_masks.enabled",
                    f"teachers.{index}.taps",
                    "extract.taps",
                )
        if not self.teachers and not self.train.task_loss:
            raise SettingsConflict(
                "train.task_loss is false and teachers is empty: training would have no loss; "
                "set teachers or task_loss: true",
                "train.task_loss",
                "teachers",
            )
        return self

    @model_validator(mode="after")
    def _dynamic_lambda_consistent(self) -> Settings:
        dynamic, key = self.distillation.dynamic_lambda, "distillation.dynamic_lambda"
        implied = METRIC_MODES[dynamic.metric]
        if dynamic.mode not in (None, implied):
            better = "higher" if implied == "max" else "lower"
            raise SettingsConflict(
                f"{key}.mode {dynamic.mode} contradicts {key}.metric {dynamic.metric}, of which "
                f"{better} is better; expected mode {implied} or null",
                f"{key}.mode",
                f"{key}.metric",
            )
        return self

    @model_validator(mode="after")
    def _dynamic_lambda_usable(self) -> Settings:
        dynamic, key = self.distillation.dynamic_lambda, "distillation.dynamic_lambda"
        if not dynamic.enabled:
            return self
        if self.data.val is None:
            raise SettingsConflict(
                f"{key}.enabled needs data.val: lambda_kd follows a validation metric; set "
                "data.val or enabled: false",
                f"{key}.enabled",
                "data.val",
            )
        if not self.teachers:
            raise SettingsConflict(
                f"{key}.enabled needs teachers: there is no distillation loss to weigh; set "
                "teachers or enabled: false",
                f"{key}.enabled",
                "teachers",
            )
        distillation = self.distillation
        stored = distillation.use_precomputed_features and distillation.val_features is None
        if dynamic.metric == "val/kd_loss" and stored:
            raise SettingsConflict(
                f"{key}.metric val/kd_loss needs online teachers or distillation.val_features "
                "(distillation.use_precomputed_features is true)",
                f"{key}.metric",
                "distillation.val_features",
                "distillation.use_precomputed_features",
            )
        if dynamic.factor == 1:
            raise SettingsConflict(
                f"{key}.factor 1 never lowers lambda_kd; expected a factor below 1",
                f"{key}.enabled",
                f"{key}.factor",
            )
        if dynamic.min_lambda >= dynamic.initial:
            raise SettingsConflict(
                f"{key}.min_lambda {dynamic.min_lambda} must be below {key}.initial "
                f"{dynamic.initial}, or lambda_kd can never be lowered",
                f"{key}.min_lambda",
                f"{key}.initial",
            )
        return self

    @model_validator(mode="after")
    def _training_consistent(self) -> Settings:
        train = self.train
        if train.early_stop_patience is not None and self.data.val is None:
            raise SettingsConflict(
                f"train.early_stop_patience {train.early_stop_patience} needs data.val: it "
                "counts validations; set data.val or early_stop_patience: null",
                "train.early_stop_patience",
                "data.val",
            )
        if train.batch_size % train.grad_accumulation:
            raise SettingsConflict(
                f"train.batch_size {train.batch_size} must be divisible by "
                f"train.grad_accumulation {train.grad_accumulation}",
                "train.batch_size",
                "train.grad_accumulation",
            )
        conflict = _across_batch_conflict(self, processes=1)
        if conflict is not None:
            raise conflict
        return self

    @model_validator(mode="after")
    def _attention_consistent(self) -> Settings:
        attention = self.distillation.attention
        for index, teacher in enumerate(self.teachers):
            if attention.enabled and model_frame(teacher.model_type, teacher.frame) == "square":
                raise SettingsConflict(
                    f"distillation.attention.enabled: teacher '{teacher.name}' runs in the "
                    "square frame, whose attention maps cover other pixels than the student's; "
                    f"set teachers.{index}.frame longest_side or switch attention matching off",
                    "distillation.attention.enabled",
                    f"teachers.{index}.frame",
                )
        if not (attention.enabled and self.distillation.use_precomputed_features):
            return self
        grid = self.extract.attention_grid
        if attention.grid_size != grid:
            raise SettingsConflict(
                f"distillation.attention.grid_size {attention.grid_size} must equal "
                f"extract.attention_grid {grid} with precomputed features: the stored maps are "
                f"{grid}^2 x {grid}^2",
                "distillation.attention.grid_size",
                "extract.attention_grid",
                "distillation.use_precomputed_features",
            )
        if self.train.augment.flip:
            # Online teachers see the flipped image; stored coarse maps cannot be mirrored.
            raise SettingsConflict(
                f"train.augment.flip {self.train.augment.flip} cannot be used with "
                "distillation.attention.enabled and precomputed features: stored coarse "
                "attention maps are not mirrored; set flip: 0 or use online teachers",
                "train.augment.flip",
                "distillation.attention.enabled",
                "distillation.use_precomputed_features",
            )
        return self

    @model_validator(mode="after")
    def _geometry_online(self) -> Settings:
        distillation = self.distillation
        stored = distillation.use_precomputed_features and distillation.features is not None
        geometric = self.train.augment.geometric
        if geometric and stored and self.teachers:
            key = f"train.augment.{geometric[0]}"
            raise SettingsConflict(
                f"{key} needs online teachers: stored teacher features are those of the "
                "untransformed image; train with --online (distillation.use_precomputed_features: "
                "false) or switch it off",
                key,
                "distillation.use_precomputed_features",
                "distillation.features",
            )
        return self

    @model_validator(mode="after")
    def _compute_consistent(self) -> Settings:
        for section, job in (("train", self.train), ("extract", self.extract)):
            if job.precision == "fp16" and _on_cpu(job.device):
                raise SettingsConflict(
                    f"{section}.precision fp16 needs a CUDA device, but {section}.device is "
                    f"'{job.device}'; use fp32 or bf16",
                    f"{section}.precision",
                    f"{section}.device",
                )
        extract = self.extract
        if extract.compile and extract.fast_teacher == "off":
            raise SettingsConflict(
                "extract.compile compiles the fast teacher, but extract.fast_teacher is off; "
                "set fast_teacher: on or auto, or compile: false",
                "extract.compile",
                "extract.fast_teacher",
            )
        if extract.compile and extract.fast_teacher == "auto" and _on_cpu(extract.device):
            raise SettingsConflict(
                "extract.compile compiles the fast teacher, but extract.fast_teacher auto is off "
                f"on extract.device '{extract.device}'; set fast_teacher: on or compile: false",
                "extract.compile",
                "extract.fast_teacher",
                "extract.device",
            )
        return self

    @model_validator(mode="after")
    def _label_free_consistent(self) -> Settings:
        unlabelled = self.data.prompts.unlabelled
        decoder = self.distillation.decoder
        if unlabelled != "none" and not (self.teachers and decoder.enabled and decoder.weight):
            raise SettingsConflict(
                f"data.prompts.unlabelled {unlabelled} needs the teachers' decoders: set "
                "teachers and distillation.decoder.enabled, or unlabelled: none",
                "data.prompts.unlabelled",
                "distillation.decoder.enabled",
                "teachers",
            )
        if self.train.pseudo_mask_weight and unlabelled != "teacher_masks":
            raise SettingsConflict(
                f"train.pseudo_mask_weight {self.train.pseudo_mask_weight} weighs teacher masks, "
                f"but data.prompts.unlabelled is {unlabelled}; expected teacher_masks",
                "train.pseudo_mask_weight",
                "data.prompts.unlabelled",
            )
        return self

    @model_validator(mode="after")
    def _data_consistent(self) -> Settings:
        if self.data.annotation_file is not None and self.data.layout not in ("auto", "coco"):
            raise SettingsConflict(
                f"data.annotation_file '{self.data.annotation_file}' is a COCO file, but "
                f"data.layout is {self.data.layout}; expected layout coco or auto",
                "data.annotation_file",
                "data.layout",
            )
        return self

    def to_yaml(self) -> str:
        """The resolved settings as YAML that `load_settings` reads back to the same values."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _on_cpu(device: str) -> bool:
    """Whether a device setting names anything but CUDA (auto may find CUDA at run time)."""
    return device.split(":")[0] not in ("auto", "cuda")


def check_micro_batch(settings: Settings, world_size: int) -> None:
    """Raise `SettingsError` when the micro-batch of each of `world_size` processes is too
    small for the settings (the load-time check assumes one process)."""
    conflict = _across_batch_conflict(settings, processes=world_size)
    if conflict is not None:
        raise SettingsError(str(conflict))


def _across_batch_conflict(settings: Settings, processes: int) -> SettingsConflict | None:
    """Relations between 2 or fewer images carry nothing: across-batch RKD would be 0."""
    rkd, train = settings.distillation.rkd, settings.train
    micro = train.batch_size // processes // train.grad_accumulation
    if not (rkd.enabled and rkd.across_batch) or micro > 2:
        return None
    over = f" over {processes} processes" if processes > 1 else ""
    return SettingsConflict(
        f"distillation.rkd.across_batch needs at least 3 images per micro-batch, but "
        f"train.batch_size {train.batch_size}{over} and train.grad_accumulation "
        f"{train.grad_accumulation} give {micro}, and RKD over them is always 0; raise "
        "batch_size or set across_batch: false",
        "distillation.rkd.across_batch",
        "train.batch_size",
        "train.grad_accumulation",
    )


# --------------------------------------------------------------------------- loading


def read_yaml_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML settings file (empty file: empty mapping)."""
    if not path.is_file():
        raise SettingsError(f"{path}: settings file does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SettingsError(f"{path}{where}: not valid YAML: {error}".splitlines()[0]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    return values


def read_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested values from `SAMKD_...` variables (`SAMKD_TRAIN__LR=1e-3` -> train.lr)."""
    source = EnvSettingsSource(
        Settings,
        case_sensitive=False,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_parse_none_str="null",
    )
    if environ is not None:
        source.env_vars = {key.lower(): value for key, value in environ.items()}
    try:
        return dict(source())
    except Exception as error:  # pydantic-settings reports bad JSON with its own type
        raise SettingsError(f"environment: {error}".splitlines()[0]) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Assign `value` at `a.b.0.c` inside nested dicts and lists, creating dicts as needed."""
    parts = dotted_key.split(".")
    node: Any = values
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SettingsError(f"--set {dotted_key}: no list item '{where}'")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
        else:
            raise SettingsError(f"--set {dotted_key}: '{where}' is not a section")


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `update`, recursing into mappings (lists are replaced whole)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_file: Path | None = None,
    assignments: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve defaults < file < environment < `--set` assignments < flags into `Settings`.

    `flags` maps dotted keys to values of a subcommand's dedicated options (None: not given).
    `environ` defaults to `os.environ`. Raises `SettingsError` with a one-line message that
    names where the offending value came from.
    """
    origins: dict[str, str] = {}
    values: dict[str, Any] = read_yaml_file(config_file) if config_file else {}
    _record_origins(values, str(config_file), origins)
    environment = read_environment(os.environ if environ is None else environ)
    _record_origins(environment, "environment", origins)
    values = deep_merge(values, environment)
    for assignment in assignments:
        key, value = parse_assignment(assignment)
        set_dotted(values, key, value)
        origins[key] = f"--set {assignment}"
    for dotted_key, value in (flags or {}).items():
        if value is not None:
            set_dotted(values, dotted_key, value)
            origins[dotted_key] = "option"
    try:
        return Settings(**values)
    except ValidationError as error:
        raise SettingsError(format_validation_error(error, origins)) from None


def _record_origins(values: Mapping[str, Any], label: str, origins: dict[str, str]) -> None:
    """Remember, for every dotted key in `values`, that `label` set it."""

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, f"{prefix}.{key}" if prefix else str(key))
        if prefix:
            if label == "environment":
                variable = ENV_PREFIX + prefix.upper().replace(".", ENV_NESTED_DELIMITER)
                origins[prefix] = f"environment variable {variable}"
            else:
                origins[prefix] = label

    walk(values, "")


def _origin_of(dotted: str, origins: Mapping[str, str]) -> str:
    """The source of `dotted` or of its nearest parent that has one."""
    return _given_at(dotted, origins) or "settings"


def _given_at(dotted: str, origins: Mapping[str, str]) -> str | None:
    """The source of `dotted`, of its nearest parent, or of a key inside it (None: default)."""
    parts = dotted.split(".")
    for length in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:length]))
        if found is not None:
            return found
    for key, found in origins.items():  # a whole misspelt section: the source of a key in it
        if key.startswith(f"{dotted}."):
            return found
    return None


def _origins_of_conflict(conflict: SettingsConflict, origins: Mapping[str, str] | str) -> str:
    """The sources of the keys that contradict each other, e.g. `run.yaml and --set ...`."""
    if isinstance(origins, str):
        return origins
    found = (_given_at(key, origins) for key in conflict.keys)
    return " and ".join(dict.fromkeys(origin for origin in found if origin)) or "settings"


# --------------------------------------------------------------------------- errors


def _fields_at(location: Sequence[str | int]) -> list[str]:
    """Valid keys of the section that holds `location`'s last key."""
    model: Any = Settings
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `list[X]` or `X | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def format_validation_error(
    error: ValidationError, origins: Mapping[str, str] | str = "settings"
) -> str:
    """One line: where the value came from, the dotted key, what was wrong, and the closest
    valid key for a misspelt one."""
    first = error.errors()[0]
    more = len(error.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    conflict = first.get("ctx", {}).get("error")
    if isinstance(conflict, SettingsConflict):  # its message names every key itself
        return f"{_origins_of_conflict(conflict, origins)}: {conflict}{suffix}"
    # "[key]" is pydantic's marker of a bad mapping key (e.g. in train.frozen_until).
    location = [part for part in first["loc"] if part not in ("", "[key]")]
    dotted = ".".join(str(part) for part in location) or "(root)"
    origin = origins if isinstance(origins, str) else _origin_of(dotted, origins)
    if first["type"] == "extra_forbidden":
        valid = _fields_at(location)
        close = difflib.get_close_matches(str(location[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{origin}: unknown key '{dotted}'{hint}{suffix}"
    message = first["msg"].removeprefix("Value error, ")
    shown = first.get("input")
    value = "" if isinstance(shown, dict | list) or shown is None else f" (got {shown!r})"
    if "got " in message:
        value = ""
    return f"{origin}: {dotted}: {message}{value}{suffix}"
