"""Schema of the matching task: its ``data``, ``model`` and ``baselines`` sections, and checks.

Coordinates are in units of the scene's extent: synthetic source points are drawn in the unit
square centred at the origin, and image keypoints are divided by the image's longer side, so
``noise=0.01`` is 1% of the extent and ``translation=0.1`` a tenth of it for both sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.app.config import (
    OptimConfig,
    RunConfig,
    TrainerConfig,
    check_choice,
    check_layer_options,
    check_range,
)

SOURCES = ("synthetic", "images")
WARPS = ("similarity", "affine", "homography", "nonrigid")
# Warps an image can be resampled under (a smooth displacement field has no closed inverse).
IMAGE_WARPS = ("similarity", "affine", "homography")
NORMALIZATIONS = ("none", "center", "whiten")
DESCRIPTORS = ("linear", "cnn")
TRANSPORTS = ("dustbin", "unbalanced")
# Photographs scikit-image ships inside its wheel (skimage.data loads them without network).
BUNDLED_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


@dataclass
class WarpConfig:
    """The random transform from the first point set to the second.

    Each sample draws one of ``kinds``. Every kind starts from a similarity: rotation uniform
    in +-``rotation`` degrees, scale log-uniform in [1/(1+scale), 1+scale], translation
    uniform in +-``translation`` per axis. ``affine`` adds a log-uniform aspect ratio in
    [1/(1+anisotropy), 1+anisotropy] and a shear uniform in +-``shear``; ``homography`` adds
    to the affine map projective terms uniform in +-``perspective``; ``nonrigid`` composes the
    affine map with a smooth displacement field: ``bumps`` Gaussian bumps of width
    ``bump_width`` whose displacements are about ``nonrigid`` (all in units of the extent).
    """

    kinds: list[str] = field(default_factory=lambda: ["affine"])
    rotation: float = 30.0
    scale: float = 0.25
    translation: float = 0.1
    anisotropy: float = 0.25
    shear: float = 0.15
    perspective: float = 0.3
    nonrigid: float = 0.04
    bumps: int = 4
    bump_width: float = 0.3


@dataclass
class SyntheticConfig:
    """Random point sets: ``min_inliers``..``max_inliers`` points with a counterpart, warped,
    plus outliers on both sides so that ``outlier_fraction`` of each set has no match.
    ``missing_fraction`` of the inliers lose their counterpart (occlusion: they stay in the
    first set, unmatched). Gaussian ``noise`` (standard deviation, units of the extent) moves
    every warped point."""

    min_inliers: int = 28
    max_inliers: int = 40
    outlier_fraction: float = 0.2
    missing_fraction: float = 0.0
    noise: float = 0.01


@dataclass
class ImageConfig:
    """Two views of a bundled photograph (``data.source=images``, see tasks/matching/photos.py).

    Photographs are resized so that their shorter side is ``short_side`` pixels. A sample is a
    ``crop`` x ``crop`` view of one and a second view under a random ``data.warp`` (in units of
    the view's side), each view with its own photometric change: contrast log-uniform in
    [1/(1+contrast), 1+contrast], brightness uniform in +-``brightness``, Gaussian blur of
    sigma uniform in [0, ``blur``] pixels, Gaussian noise of standard deviation uniform in
    [0, ``noise``] (intensities in [0, 1]). Keypoints: the ``max_keypoints`` strongest Harris
    corners (structure tensor at ``harris_sigma``) at least ``min_distance`` pixels apart; two
    match when the warp carries one to within ``match_px`` pixels of the other and each is the
    other's nearest. Every keypoint carries its ``patch`` x ``patch`` pixel patch. Training,
    validation and test pairs come from different photographs.
    """

    train_images: list[str] = field(
        default_factory=lambda: [
            "astronaut",
            "brick",
            "camera",
            "cell",
            "coins",
            "gravel",
            "hubble_deep_field",
            "immunohistochemistry",
            "moon",
            "page",
            "retina",
            "text",
        ]
    )
    val_images: list[str] = field(default_factory=lambda: ["grass", "rocket"])
    test_images: list[str] = field(default_factory=lambda: ["chelsea", "coffee"])
    short_side: int = 256
    crop: int = 160
    max_keypoints: int = 64
    min_distance: int = 4
    harris_sigma: float = 1.5
    match_px: float = 3.0
    patch: int = 15
    contrast: float = 0.3
    brightness: float = 0.1
    blur: float = 1.0
    noise: float = 0.02


@dataclass
class DataConfig:
    source: str = "synthetic"
    # Training samples per epoch, drawn afresh every time (an endless stream, cut into epochs);
    # the validation and test sets are fixed by split_seed, independent of the run's seed.
    train_size: int = 2048
    val_size: int = 256
    test_size: int = 512
    split_seed: int = 0
    batch_size: int = 16
    num_workers: int = 0
    warp: WarpConfig = field(default_factory=WarpConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    images: ImageConfig = field(default_factory=ImageConfig)


@dataclass
class ModelConfig:
    """Shared attention encoder, cosine scores, Sinkhorn with a dustbin row and column.

    ``normalize``: how each set's coordinates are standardised before encoding (``center``:
    mean and RMS radius; ``whiten``: mean and covariance, which reduces any affine map to a
    rotation; ``none``). ``knn``: neighbours whose relative positions describe each point's
    local shape; ``radial_frame``: express those offsets in the point's radial frame (the unit
    vector from the centroid and its normal), which a rotation about the centroid leaves
    unchanged, so that after whitening a point and its match have the same local shape under
    any affine map. ``layers``: rounds of self- then cross-attention. ``gamma``: the Sinkhorn
    layer's inverse temperature on costs in [-1, 1] (negated cosine similarities), so it alone
    bounds how sharp P gets and how many iterations the solver needs. ``unmatched_weight``:
    weight of the dustbin terms of the loss against the matched ones. ``match_threshold``:
    least assignment probability of a predicted match.
    """

    dim: int = 32
    # Descriptor of a keypoint's pixel patch (data.source=images): a linear map or a CNN of
    # `channels` base channels.
    descriptor: str = "linear"
    channels: int = 16
    # dustbin: a learnable no-match row and column, balanced OT; unbalanced: soft marginals
    # (ddn.sinkhorn's marginal_penalty=rho), the mass a point's row transports is its odds of
    # having a match.
    transport: str = "dustbin"
    rho: float = 1.0
    layers: int = 4
    heads: int = 4
    knn: int = 8
    radial_frame: bool = True
    normalize: str = "whiten"
    gamma: float = 10.0
    ot_tol: float = 1e-4
    ot_max_iter: int = 500
    # Further keyword arguments of ddn.OptimalTransport (implicit_solver, check_every).
    ot_kwargs: dict[str, Any] = field(default_factory=dict)
    dustbin_init: float = 0.0
    unmatched_weight: float = 1.0
    match_threshold: float = 0.2
    # torch intra-op threads in each training process (null: torch's default). The model's
    # tensors are small: a second thread costs more in synchronisation than it computes.
    threads: int | None = 1


@dataclass
class BaselineConfig:
    """Nearest neighbour and Hungarian assignment on raw coordinates, scored on the test set
    with the model's metric. A pair is kept when its distance is below ``max_distance``;
    null picks the distance that maximises each baseline's F1 on the validation set."""

    enabled: bool = True
    max_distance: float | None = None


@dataclass
class MatchingRun(RunConfig):
    """The task's defaults: 16 epochs of 2048 fresh samples in small batches of 16 (on a CPU
    an update costs what its samples cost, so a budget buys more updates this way), AdamW at
    1e-2 after a one-epoch warm-up, cosine-decayed to 0, gradients clipped at norm 1. What
    they reach: docs/benchmarks/matching_cpu.md."""

    task: str = "matching"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_epochs=16, gradient_clip_val=1.0)
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_epochs=1))


def validate(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    _check_data(cfg, problems)
    _check_model(cfg, problems)
    check_range(cfg, "baselines.max_distance", problems, low=0.0, low_open=True)
    return problems


def _check_list(cfg: DictConfig, key: str, choices: tuple[str, ...], problems: list[str]) -> None:
    values = OmegaConf.select(cfg, key)
    if not values:
        problems.append(f"{key} must name at least one of {list(choices)}")
    for value in values or ():
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {list(choices)}")


def _check_data(cfg: DictConfig, problems: list[str]) -> None:
    data = cfg.data
    check_choice(cfg, "data.source", SOURCES, problems)
    for key in ("train_size", "val_size", "test_size", "batch_size"):
        check_range(cfg, f"data.{key}", problems, low=1)
    check_range(cfg, "data.num_workers", problems, low=0)

    _check_list(cfg, "data.warp.kinds", WARPS, problems)
    for key in ("rotation", "scale", "translation", "anisotropy", "shear", "nonrigid"):
        check_range(cfg, f"data.warp.{key}", problems, low=0.0)
    check_range(cfg, "data.warp.rotation", problems, high=180.0)
    check_range(cfg, "data.warp.shear", problems, high=0.9)
    # Beyond this the projective denominator can vanish inside the unit square.
    check_range(cfg, "data.warp.perspective", problems, low=0.0, high=0.9)
    check_range(cfg, "data.warp.bumps", problems, low=1)
    check_range(cfg, "data.warp.bump_width", problems, low=0.0, low_open=True)

    check_range(cfg, "data.synthetic.min_inliers", problems, low=1)
    check_range(cfg, "data.synthetic.max_inliers", problems, low=data.synthetic.min_inliers)
    check_range(cfg, "data.synthetic.outlier_fraction", problems, low=0.0, high=0.9)
    check_range(cfg, "data.synthetic.missing_fraction", problems, low=0.0, high=0.9)
    check_range(cfg, "data.synthetic.noise", problems, low=0.0)

    for key in ("train_images", "val_images", "test_images"):
        _check_list(cfg, f"data.images.{key}", BUNDLED_IMAGES, problems)
    if data.source == "images":
        kinds = [k for k in data.warp.kinds if k not in IMAGE_WARPS and k in WARPS]
        if kinds:
            problems.append(
                f"data.warp.kinds: {kinds} cannot resample an image (data.source=images takes "
                f"{list(IMAGE_WARPS)})"
            )
    check_range(cfg, "data.images.crop", problems, low=32)
    check_range(cfg, "data.images.short_side", problems, low=data.images.crop)
    check_range(cfg, "data.images.max_keypoints", problems, low=2)
    check_range(cfg, "data.images.min_distance", problems, low=1)
    for key in ("match_px", "harris_sigma"):
        check_range(cfg, f"data.images.{key}", problems, low=0.0, low_open=True)
    for key in ("contrast", "brightness", "blur", "noise"):
        check_range(cfg, f"data.images.{key}", problems, low=0.0)
    check_range(cfg, "data.images.patch", problems, low=3)
    if data.images.patch % 2 == 0:
        problems.append(f"data.images.patch={data.images.patch} must be odd (centred patch)")


def _check_model(cfg: DictConfig, problems: list[str]) -> None:
    model = cfg.model
    check_range(cfg, "model.dim", problems, low=1)
    check_range(cfg, "model.layers", problems, low=0)
    check_range(cfg, "model.heads", problems, low=1)
    if model.heads >= 1 and model.dim % model.heads:
        problems.append(f"model.dim={model.dim} must be a multiple of model.heads={model.heads}")
    check_range(cfg, "model.knn", problems, low=0)
    check_choice(cfg, "model.normalize", NORMALIZATIONS, problems)
    check_choice(cfg, "model.descriptor", DESCRIPTORS, problems)
    check_choice(cfg, "model.transport", TRANSPORTS, problems)
    check_range(cfg, "model.channels", problems, low=1)
    check_range(cfg, "model.rho", problems, low=0.0, low_open=True)
    check_range(cfg, "model.unmatched_weight", problems, low=0.0)
    check_range(cfg, "model.match_threshold", problems, low=0.0, high=1.0)
    check_range(cfg, "model.threads", problems, low=1)
    gamma_ok = model.gamma > 0 and model.ot_tol > 0 and model.ot_max_iter >= 1
    check_range(cfg, "model.gamma", problems, low=0.0, low_open=True)
    check_range(cfg, "model.ot_tol", problems, low=0.0, low_open=True)
    check_range(cfg, "model.ot_max_iter", problems, low=1)
    for key in ("log_plan", "marginal_penalty"):
        if key in (model.ot_kwargs or {}):
            problems.append(f"model.ot_kwargs.{key}: set by the model (see model.transport)")
    if gamma_ok:
        check_layer_options(
            cfg,
            "model.ot_kwargs",
            "OptimalTransport",
            problems,
            gamma=model.gamma,
            tol=model.ot_tol,
            max_iter=model.ot_max_iter,
        )
