"""Typed, frozen configuration of every part of a CellSAM model.

A :class:`CellSAMConfig` fully describes the architecture; it is stored as JSON next to
every checkpoint so that a checkpoint can be rebuilt without any other information.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from cellsam.data.normalize import StainGrey, check_stain_grey


@dataclass(frozen=True)
class EncoderConfig:
    """SAM ViT image encoder. ``img_size`` is the square input the encoder sees."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck output = prompt/mask decoder width
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)

    @property
    def embedding_size(self) -> int:
        """Side of the (square) token grid / image embedding."""
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class PromptEncoderConfig:
    """SAM prompt encoder. Its width and grid come from the encoder config."""

    mask_in_chans: int = 16


@dataclass(frozen=True)
class MaskDecoderConfig:
    """SAM mask decoder with its two-way transformer."""

    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class CellFinderConfig:
    """Anchor-DETR detector on the encoder trunk features (before the neck)."""

    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_query_position: int = 3500
    num_query_pattern: int = 1
    num_classes: int = 2  # sigmoid classes, no background class
    spatial_prior: Literal["learned", "grid"] = "learned"
    attention_type: Literal["RCDA", "nn.MultiheadAttention"] = "RCDA"
    activation: Literal["relu", "gelu"] = "relu"
    prior_prob: float = 0.01  # focal-loss bias initialisation of the class head
    # Positions in [0, 1] are multiplied by this before the sine encodings. 1 (Anchor DETR): the
    # highest frequency is one cycle per image, so attention is broad. For small, dense cells set it
    # to the token-grid side (one cycle per token): sharp local attention (see registry.vit_cpu).
    pos_scale: float = 1.0
    # Content of each query at the first decoder layer: "pattern" (Anchor DETR: the pattern embedding
    # only, so queries differ only by position) or "features": pattern + the encoder memory sampled
    # (bilinear) at the query's anchor, so each query starts from what lies at its anchor (the idea of
    # two-stage / query-selection DETRs; no extra parameters). See registry.vit_cpu.
    query_content: Literal["pattern", "features"] = "pattern"
    aux_loss: bool = True


@dataclass(frozen=True)
class ConvEncoderConfig:
    """Convolutional multi-scale encoder (``CellSAMConfig.encoder_kind == "conv"``).

    Residual stages at strides 2, 4, ... (one per entry of ``widths``), a top-down path (U-Net /
    FPN style) back to stride 4 whose output is the detector's trunk (``trunk_chans`` wide), and a
    SAM-style neck from the trunk to the prompt decoder's embedding (``EncoderConfig.out_chans`` at
    stride ``EncoderConfig.patch_size``). ``style``: Cellpose's global style vector (the mean of the
    deepest stage) added to every top-down level.
    """

    widths: tuple[int, ...] = (32, 64, 128, 192, 256)
    blocks: tuple[int, ...] = (1, 1, 2, 2, 1)
    decoder_widths: tuple[int, ...] = (64, 128, 128)  # at strides 4, 8, 16 (the trunk is the first)
    style: bool = True


@dataclass(frozen=True)
class DenseFinderConfig:
    """Dense CellFinder (``CellSAMConfig.detector_kind == "dense"``): CenterNet on the stride-4 trunk.

    Per location: a cell-centre heatmap (sigmoid), the box size as log(w / stride), log(h / stride)
    and the sub-pixel offset of the centre. Boxes are the heatmap's local maxima (a
    ``peak_kernel`` max-pool), at most ``max_detections`` per image, no NMS.
    """

    head_channels: int = 64
    stride: int = 4
    peak_kernel: int = 3
    max_detections: int = 1000
    prior_prob: float = 0.1  # CenterNet's heatmap bias init (-2.19)


FlipTest: TypeAlias = Literal["off", "mirrors", "rot180"]
FLIP_TESTS: Final[tuple[FlipTest, ...]] = ("off", "mirrors", "rot180")
"""The flip tests of the dense CellFinder: ``"off"`` (the one view), ``"mirrors"`` (the tile also mirrored
left-right and up-down: two more passes of the encoder's trunk) and ``"rot180"`` (the tile also turned
180 degrees, i.e. mirrored along both axes: one more pass). Measured in ``benchmarks/flip_test.md``."""


def flip_test_mode(value: object, name: str = "flip_test") -> FlipTest:
    """``value`` as one of :data:`FLIP_TESTS`: True is ``"mirrors"`` (the first flip test), False ``"off"``;
    anything else raises ``ValueError``."""
    if isinstance(value, bool):
        return "mirrors" if value else "off"
    for mode in FLIP_TESTS:
        if value == mode:
            return mode
    raise ValueError(f"{name} must be one of {', '.join(FLIP_TESTS)} (or True / False), got {value!r}")


@dataclass(frozen=True)
class InferenceConfig:
    """Default thresholds of a trained model (the paper's values unless the model says otherwise).

    They travel with the checkpoint because they belong to the weights: the IoU head is an
    uncalibrated regression and detector scores depend on the training run.
    """

    box_threshold: float = 0.4
    # Relative box threshold: of the cells an image's boxes give, keep those scoring at least this times
    # the 90th percentile of their scores (0: off). A detector's scores are calibrated per image: where
    # its cells are clear a doubtful peak is usually debris or a fragment; where all cells are faint the
    # absolute threshold alone decides (``cellsam.inference.tiling.confident``).
    box_threshold_rel: float = 0.0
    iou_threshold: float = 0.5
    mask_threshold: float = 0.5
    # Box refinement rounds: each replaces every box prompt by the bounding box of its decoded mask
    # and decodes again (the mask decoder only; fixes detector boxes that are too loose or too tight).
    refine_boxes: int = 0
    # Whether the mask decoder's 3 multimask outputs were trained (SAM: yes). Models trained on the
    # single-mask output only (ours from v3 on) set False: prompts then always decode that one mask,
    # whatever ``multimask_output`` asks, because the other three are untrained.
    multimask: bool = True
    # Local decoding: with a decode window, the mask decoder's transformer also sees only the window's
    # tokens (``MaskDecoder``'s ``local``), so a cell's cost does not grow with the tile. It changes the
    # masks, so a model switches it on only where it was measured to keep its accuracy.
    local_decoding: bool = False
    # The median cell diameter of the training data, in image pixels at the model's tile size: the scale
    # that ``segment(diameter=...)`` brings an image's cells to. None: the model has no size reference.
    cell_diameter: float | None = None
    # How a stained bright-field colour picture (H&E and other stains) becomes this model's one grey
    # channel (``cellsam.data.normalize.rgb_to_channel``'s ``stain``): "luminance" (inverted luminance, the
    # models up to v6) or "hematoxylin" (the hematoxylin optical density). It is how the training data
    # were prepared, so it belongs to the weights.
    stain_grey: StainGrey = "luminance"
    # Flip test (CenterNet's, see :data:`FLIP_TESTS`): the dense CellFinder also sees the tile mirrored and
    # decodes the mean of the maps; fewer stray and missed peaks, for more detector time. The masks still
    # come from the one embedding of the tile as it is. True / False (older files) read as "mirrors" / "off".
    flip_test: FlipTest | bool = "off"

    def __post_init__(self) -> None:
        check_stain_grey(self.stain_grey, "inference.stain_grey")
        object.__setattr__(self, "flip_test", flip_test_mode(self.flip_test, "inference.flip_test"))


DEFAULT_DECODE_WINDOW = 3.0
"""Inference computes each box prompt's mask on decoder tokens within 3x the box's longer side (plus one
token each side; ``CellSAM.decode``'s ``window``): measured with the shipped model on the 16 sweep
images, the label images are identical to whole frames (also at 2x), for less decoder work."""


def check_decode_window(window: float | None) -> float | None:
    """``decode_window`` validated: None (or 0) for whole frames, else a finite number > 0."""
    if window is None or window == 0:
        return None
    if not math.isfinite(window) or window < 0:
        raise ValueError(f"decode_window must be > 0 (or 0 / None for whole frames), got {window}")
    return float(window)


AUTO: Final = "auto"
Diameter: TypeAlias = float | Literal["auto"] | None
DEFAULT_DIAMETER: Diameter = AUTO
"""What ``segment`` and ``cellsam segment`` do when no diameter is given (see cellsam.inference.scale)."""


POLARITIES: Final = (AUTO, "as_is", "inverted")
"""``polarity`` of ``segment``: decided per image, or the whole-cell channel as it is / inverted
(see cellsam.inference.polarity)."""


def check_polarity(polarity: str) -> str:
    """``polarity`` validated: one of :data:`POLARITIES`."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {', '.join(map(repr, POLARITIES))}, got {polarity!r}")
    return polarity


def check_diameter(diameter: float | str | None) -> Diameter:
    """``diameter`` validated: None (no rescaling), ``"auto"``, or a finite number of pixels > 0."""
    if diameter is None:
        return None
    if diameter == AUTO:
        return AUTO
    if isinstance(diameter, str):
        try:
            diameter = float(diameter)
        except ValueError:
            raise ValueError(f"diameter must be 'auto', a number of pixels > 0 or None, got {diameter!r}") from None
    if isinstance(diameter, bool) or not isinstance(diameter, numbers.Real) \
            or not math.isfinite(diameter) or diameter <= 0:  # numpy scalars are Real numbers too
        raise ValueError(f"diameter must be 'auto', a number of pixels > 0 or None, got {diameter!r}")
    return float(diameter)


def parse_diameter(text: str) -> Diameter:
    """A command-line diameter: ``auto``, ``none`` (no rescaling) or a number of pixels > 0."""
    if text.strip().lower() == "none":
        return None
    try:
        return check_diameter(text.strip().lower())
    except ValueError:
        raise ValueError(f"--diameter takes auto, none or a number of pixels > 0, got {text!r}") from None



@dataclass(frozen=True)
class CellSAMConfig:
    """The whole model: encoder, detector and SAM prompt/mask heads."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    cellfinder: CellFinderConfig = field(default_factory=CellFinderConfig)
    # "vit": SAM's ViT (``encoder``); "conv": the convolutional multi-scale encoder (``conv_encoder``,
    # with ``encoder``'s img_size, patch_size = the embedding's stride, and out_chans).
    encoder_kind: Literal["vit", "conv"] = "vit"
    conv_encoder: ConvEncoderConfig = field(default_factory=ConvEncoderConfig)
    # "detr": the paper's Anchor-DETR CellFinder (``cellfinder``); "dense": the CenterNet one
    # (``dense_finder``) on the stride-4 trunk of a conv encoder.
    detector_kind: Literal["detr", "dense"] = "detr"
    dense_finder: DenseFinderConfig = field(default_factory=DenseFinderConfig)
    # A size model (Cellpose's SizeModel: the cell diameter from the conv encoder's size features,
    # cellsam.models.size_head), fitted by a training recipe's "size" stage. Conv encoders only.
    size_head: bool = False
    # The official CellSAM checkpoint has a separate ViT for the detector; set True to
    # reproduce it faithfully. Our own models share ONE encoder pass.
    separate_detector_trunk: bool = False
    # Side (pixels of the original image) of the tile one encoder input covers. The paper
    # upsamples 512 tiles to the 1024 input of ViT-B; our CPU model sees 256 tiles at native scale.
    tile_size: int = 512
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # SAM's pixel statistics, applied to images in [0, 255].
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.encoder_kind not in ("vit", "conv"):
            raise ValueError(f"encoder_kind must be 'vit' or 'conv', got {self.encoder_kind!r}")
        if self.size_head and self.encoder_kind != "conv":
            raise ValueError("size_head reads the conv encoder's features: use encoder_kind 'conv'")
        if self.detector_kind not in ("detr", "dense"):
            raise ValueError(f"detector_kind must be 'detr' or 'dense', got {self.detector_kind!r}")
        if self.encoder_kind == "conv" and self.separate_detector_trunk:
            raise ValueError("separate_detector_trunk is for imported ViT checkpoints only")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellSAMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return dataclass_from_dict(cls, d)

    def replace(self, **changes: Any) -> CellSAMConfig:
        """Copy with top-level fields changed."""
        return dataclasses.replace(self, **changes)


def dataclass_from_dict(cls: Any, d: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        default = getattr(cls(), name) if name in fields else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = dataclass_from_dict(type(default), value)
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
