"""The one training configuration: a dataclass saved as a plain dict with a format version."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from instret.errors import InstretError

FORMAT_VERSION = 1

ARCHS = ("auto", "small", "resnet18", "resnet50")
LOSSES = ("softmax", "nce")
NEIGHBOURHOODS = ("off", "anchors", "mutual")
MULTI_VIEW_MODES = ("auto", "on", "off")

# What training turns to on a collection of several views of each thing (multi_view): colour
# kept (it tells one object from its look-alikes), a softer temperature (other views of an
# object are not pushed as far away as other objects) and crops down to 20 % (a part stands for
# the whole). Each costs copy detection, hence only where views are found; the runs that chose
# them are in docs/neighbourhoods.md. The encoder it saves also searches a colour signature
# beside its features, at colour_weight (instret.colour).
MULTI_VIEW = {"hue": 0.0, "grayscale_p": 0.0, "tau": 0.2, "crop_scale": (0.2, 1.0), "colour_weight": 1.0}
BANK_INITS = ("random", "features")
SCHEDULES = ("step", "cosine")
DATASETS = ("digits", "cifar10")

# Training recipes: augmentation and the bank's start, under the options given (the runs that
# chose them: docs/cpu-configuration.md and benchmarks/README.md, "Search quality").
# "paper": the authors' (docs/method.md); the default, except for a --data run given a --time-budget.
# "retrieval": the paper's augmentation plus the edits copies go through (small rotations, a
#   flat box, a slight blur), and the bank started from the network's features.
# "colour": "retrieval" with gentle colour jitter, for collections where colour tells objects apart.
# "short": the paper's, made for CPU runs of minutes rather than of 200 epochs (lr 0.005 at batch
#   64, crops of 40-100 %, milder colour jitter, a cosine schedule, the bank from features); the
#   default for a --data run given a --time-budget.
RECIPES = {
    "paper": {},
    "short": {
        "bank_init": "features",
        "lr": 0.005,
        "batch_size": 64,
        "crop_scale": (0.4, 1.0),
        "jitter": 0.2,
        "hue": 0.1,
        "lr_schedule": "cosine",
        "neighbourhoods": "mutual",
    },
    "retrieval": {"bank_init": "features", "rotate": 10.0, "erase_p": 0.25, "blur_p": 0.2},
    "colour": {
        "bank_init": "features",
        "rotate": 10.0,
        "erase_p": 0.25,
        "blur_p": 0.2,
        "jitter": 0.3,
        "hue": 0.02,
        "grayscale_p": 0.05,
    },
}


@dataclass
class TrainConfig:
    # data
    data: str | None = None  # a folder of images; None means `dataset`
    dataset: str | None = "digits"  # None in the config.json of a --data run
    data_root: str = "data"
    download: bool = False
    image_size: int | None = None  # None: 32 for the built-in sets; from the images for --data (auto_image_size)
    recipe: str | None = None  # RECIPES; None: the paper's (short under a time budget; the digits' preset)
    # model
    arch: str = "auto"  # auto: resnet18 on a GPU, small on the CPU
    low_dim: int = 128
    # optimisation (the authors' CIFAR recipe, docs/method.md)
    epochs: int | None = None  # None: 200, or the dataset's preset; with time_budget, the most to plan
    time_budget: float | None = None  # minutes: plan the epochs (and so the schedule) to end in this time
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.6, 0.8)  # fractions of `epochs`: 120 and 160 of 200
    lr_gamma: float = 0.1
    lr_schedule: str = "step"  # step: the authors'; cosine: half a cosine from lr to 0 over the epochs
    # instance discrimination
    loss: str = "softmax"
    nce_k: int = 4096
    tau: float = 0.1
    bank_momentum: float = 0.5
    prox_lambda: float = 0.0
    bank_init: str = "random"  # random: the paper's; features: the untrained network's features
    # neighbourhood discovery (instret.neighbours): rounds of mining the bank for positives
    neighbourhoods: str = "off"  # off, anchors (AND's curriculum) or mutual (mutual neighbours at a calibrated cosine)
    neighbour_k: int = 10  # nearest bank rows a neighbourhood is taken from
    neighbour_rounds: int = 4
    neighbour_start: float = 0.3  # fraction of the epochs trained before the first round
    neighbour_quantile: float = 0.5  # mutual: the cosine two views of one image reach this share of the time
    # on: train for several views of each thing (MULTI_VIEW); auto: start again with it on when
    # the multi-view check (instret.neighbours.views_check_epoch) finds a quarter of the images
    # or more with a confident neighbour; off: never
    multi_view: str = "auto"
    # augmentation (the paper's)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - jitter, 1 + jitter]
    hue: float | None = None  # hue shift in [-hue, hue] turns; None: min(jitter, 0.5), as the paper
    grayscale_p: float = 0.2
    flip: bool = True
    # beyond the paper, for edited copies (augment.py): rotations within +-rotate degrees, a
    # flat-colour box over part of the image (an overlay) with chance erase_p, a slight blur
    rotate: float = 0.0
    erase_p: float = 0.0
    blur_p: float = 0.0
    # evaluation
    knn_k: int = 200
    monitor_size: int = 5000  # held-out images the per-epoch kNN monitor embeds (0: all); the final evaluation uses all
    # speed (None: on where it pays, mostly on a CUDA device; each can be forced on or off)
    amp: bool | None = None  # bf16 autocast for the encoder: a GPU with bf16, a CPU with AMX
    compile: bool = False  # torch.compile the encoder
    fused_optimizer: bool | None = None
    channels_last: bool = True
    # run
    out: str | None = None
    device: str = "auto"
    workers: int = 2
    max_image_pixels: int | None = None  # decompression-bomb limit per image file; None: Pillow's 89 M; 0: none
    # --data only: decode each batch from the files in `workers` processes instead of holding the
    # decoded set in memory; None: streamed when it would take over a quarter of the memory
    stream: bool | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if d.get("extra") == {}:  # an empty field that runs written before 2026-11-29 carry; never used
            del d["extra"]
        if version > FORMAT_VERSION:
            raise InstretError(f"configuration has format version {version}; this instret reads up to {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InstretError(f"unknown configuration key(s): {', '.join(unknown)}")
        for name in ("lr_milestones", "crop_scale"):
            if name in d and d[name] is not None:
                d[name] = tuple(d[name])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InstretError(msg)

        need(self.arch in ARCHS, f"--arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        need(self.bank_init in BANK_INITS, f"--bank-init must be one of {', '.join(BANK_INITS)}")
        need(self.lr_schedule in SCHEDULES, f"--lr-schedule must be one of {', '.join(SCHEDULES)}")
        need(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        need(
            self.data is not None or self.dataset in DATASETS,
            f"--dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}",
        )
        need(self.epochs is None or self.epochs >= 1, "--epochs must be at least 1")
        need(self.batch_size >= 2, "--batch-size must be at least 2")
        need(self.lr > 0, "--lr must be positive")
        need(self.tau > 0, "--tau must be positive")
        need(self.nce_k >= 1, "--nce-k must be at least 1")
        need(0.0 <= self.bank_momentum < 1.0, "--bank-momentum must be in [0, 1)")
        need(self.prox_lambda >= 0, "--prox-lambda must be non-negative")
        need(
            self.neighbourhoods in NEIGHBOURHOODS,
            f"--neighbourhoods must be one of {', '.join(NEIGHBOURHOODS)}, not {self.neighbourhoods!r}",
        )
        need(
            self.neighbourhoods == "off" or self.loss == "softmax",
            "--neighbourhoods takes the exact softmax's mass over each neighbourhood: use --loss softmax",
        )
        need(
            self.neighbour_k >= 1 and self.neighbour_rounds >= 1,
            "--neighbour-k and --neighbour-rounds must be at least 1",
        )
        need(0 <= self.neighbour_start < 0.8, "neighbour_start must be in [0, 0.8)")
        need(0 <= self.neighbour_quantile <= 1, "neighbour_quantile must be in [0, 1]")
        need(self.knn_k >= 1, "--knn-k must be at least 1")
        need(self.monitor_size >= 0, "--monitor-size must be non-negative")
        need(self.low_dim >= 1, "--low-dim must be at least 1")
        need(self.image_size is None or 8 <= self.image_size <= 1024, "--image-size must be between 8 and 1024")
        need(self.time_budget is None or self.time_budget > 0, "--time-budget must be a positive number of minutes")
        need(self.recipe is None or self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}")
        need(self.workers >= 0, "--workers must be non-negative")
        need(self.max_image_pixels is None or self.max_image_pixels >= 0, "--max-image-pixels must be non-negative")
        need(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale must satisfy 0 < lo <= hi <= 1")
        need(0 <= self.rotate <= 180, "rotate must be in [0, 180] degrees")
        need(0 <= self.erase_p <= 1 and 0 <= self.blur_p <= 1, "erase_p and blur_p must be in [0, 1]")
        need(
            not self.stream or self.data is not None,
            "--stream reads a --data folder; the built-in datasets are held in memory",
        )


# What `epochs: None` means: the authors' 200, except for the embedded digits.
PAPER_EPOCHS = 200
DEFAULT_EPOCHS = {"digits": 40}

# The embedded digits are 8x8 greyscale strokes, 1,438 of them: mirroring changes a digit's
# identity, 20 % crops keep too little of it, and 11 steps an epoch are too few to learn from.
# These values, used wherever the user sets nothing else, reach kNN top-1 ~0.93 in about a
# minute on 2 CPU cores (the paper's recipe: ~0.55 in the same time).
DATASET_PRESETS = {
    "digits": {"batch_size": 32, "flip": False, "crop_scale": (0.5, 1.0), "jitter": 0.2, "grayscale_p": 0.0}
}


def with_presets(options: dict) -> dict:
    """The recipe's (or the dataset's) preset under the options given (the options win)."""
    if options.get("data") is not None:
        recipe = options.get("recipe") or ("short" if options.get("time_budget") is not None else "paper")
        return {**RECIPES.get(recipe, {}), **options, "recipe": recipe}
    if options.get("recipe") is not None:
        return {**RECIPES.get(options["recipe"], {}), **options}
    preset = DATASET_PRESETS.get(options.get("dataset", TrainConfig.dataset), {})
    return {**preset, **options}


def default_text(name: str) -> str:
    """A configuration key's default as help text shows it: TrainConfig's value, and the
    embedded digits' where their preset differs (so the help cannot drift from the code)."""
    value = PAPER_EPOCHS if name == "epochs" else getattr(TrainConfig, name)
    digits = {**DATASET_PRESETS["digits"], "epochs": DEFAULT_EPOCHS["digits"]}.get(name, value)
    return f"{value}" if digits == value else f"{value}; {digits} for digits"


def multi_view_text() -> str:
    """MULTI_VIEW as help text shows it (so it cannot drift)."""
    return (
        f"colour kept (hue {MULTI_VIEW['hue']:g}, greyscale {MULTI_VIEW['grayscale_p']:g}), tau {MULTI_VIEW['tau']:g}, "
        f"crops from {MULTI_VIEW['crop_scale'][0]:.0%}; searched with a colour signature beside the features"
    )


def recipe_text(name: str) -> str:
    """A recipe's settings as help text shows them, read from RECIPES (so they cannot drift)."""
    return ", ".join(
        f"{key} {'-'.join(map(str, value)) if isinstance(value, tuple) else value}"
        for key, value in RECIPES[name].items()
    )


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON file of configuration keys (plain data only: yaml.safe_load)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InstretError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except Exception as e:  # any parse error becomes one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InstretError(f"cannot parse config file {path}: {first}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise InstretError(f"config file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in d.items()}
