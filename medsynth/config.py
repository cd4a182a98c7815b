"""Training recipes: pydantic models for the YAML configs, and :func:`load_config`.

A recipe has four sections::

    data:       what to train on and how to present it (manifest, 2D/3D, slice axis, spacing,
                patch size, intensity normalisation, optional class conditioning)
    model:      the model family and its networks: ``model.family`` names a family of
                :mod:`medsynth.registry`, whose config class validates the section
                (``gan`` -> :class:`GanModelConfig`, ``ldm`` -> :class:`LdmModelConfig`)
    optimizer:  optimiser settings shared by a family's networks (learning rates are in ``training``)
    training:   the loop (steps, batch, learning rates, AMP, EMA, intervals, seed, workers)

Every model has ``extra="forbid"``; a bad recipe raises one :class:`~medsynth.errors.ConfigError`
listing every problem with its field path (``training.batch_size: Input should be greater than 0
(got -1)``).

``load_config(path, overrides)`` applies ``--set key=value`` overrides before validation: the key is
a dotted path (``training.max_steps``), the value is parsed as a YAML scalar or flow collection
(``8`` -> int, ``1e-4`` -> float, ``[32, 32]`` -> list, ``null`` -> None).

A family's model section subclasses :class:`ModelSection` with ``family: Literal["<name>"]`` and is
registered in :mod:`medsynth.registry`; nothing here lists the families.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from medsynth.errors import ConfigError

DEFAULT_MRI_PERCENTILES = (0.5, 99.5)
#: the family of a recipe whose ``model`` section does not name one
DEFAULT_FAMILY = "gan"


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------- data


class DataConfig(StrictModel):
    """What to train on and how to present it to the model.

    manifest: the dataset (MSD JSON, CSV, nnU-Net raw folder); ``--data`` on the CLI overrides it.
    dim: 2 trains on 2D images (2D volumes, or slices drawn from 3D volumes along ``slice_axis``);
        3 trains on 3D patches.
    slice_axis: the volume axis (file index order) 2D slices are drawn along, for 3D volumes.
    spacing: target voxel size in mm, one value per axis of the volumes (3 for 3D volumes, 2 for 2D
        volumes); volumes are resampled to it (images linearly, labels nearest) before training.
        None keeps the native grid.
    size: the training patch (3D, 3 values) or slice crop (2D, 2 values) in voxels; smaller volumes
        are padded with background. Each value must be divisible by the model's downsampling factor.
    ct_window: ``[lo, hi]`` in the dataset's units (HU): intensities are clipped to it and mapped to [0, 1].
    mri_percentiles: ``[lo, hi]`` percentiles of the training set's intensities (per channel) mapped to
        [0, 1] (values outside are clipped). The default when ``ct_window`` is not given.
    class_key: a per-case manifest field (``Case.extra``) used for class conditioning, e.g. ``modality``.
    classes: the class values in order; None takes the sorted distinct values found in the data.
    foreground_slices: draw 2D slices only where the label map has foreground (when any slice has).
    """

    manifest: Path | None = None
    dim: Literal[2, 3] = 3
    slice_axis: Literal[0, 1, 2] = 2
    spacing: list[Annotated[float, Field(gt=0)]] | None = None
    size: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32, 32, 32])
    ct_window: tuple[float, float] | None = None
    mri_percentiles: tuple[float, float] | None = None
    class_key: str | None = None
    classes: list[str] | None = None
    foreground_slices: bool = True

    @field_validator("spacing")
    @classmethod
    def _spacing_len(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and len(v) not in (2, 3):
            raise ValueError(f"needs 2 or 3 values (one per volume axis), got {len(v)}")
        return v

    @field_validator("ct_window")
    @classmethod
    def _window_order(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"lower bound must be below the upper bound, got {list(v)}")
        return v

    @field_validator("mri_percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 <= v[0] < v[1] <= 100.0):
            raise ValueError(f"needs 0 <= lo < hi <= 100, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if len(self.size) != self.dim:
            raise ValueError(f"size needs {self.dim} values for dim={self.dim}, got {self.size}")
        if self.dim == 3 and self.spacing is not None and len(self.spacing) != 3:
            raise ValueError(f"spacing needs 3 values for dim=3, got {self.spacing}")
        if self.ct_window is not None and self.mri_percentiles is not None:
            raise ValueError("set either ct_window or mri_percentiles, not both")
        if self.ct_window is None and self.mri_percentiles is None:
            object.__setattr__(self, "mri_percentiles", DEFAULT_MRI_PERCENTILES)
        return self

    @property
    def normalization_mode(self) -> Literal["ct_window", "mri_percentiles"]:
        return "ct_window" if self.ct_window is not None else "mri_percentiles"


# ---------------------------------------------------------------------------- model


class ModelSection(StrictModel):
    """Base of every family's ``model`` section: ``family`` names a registered family; a subclass
    narrows it to ``Literal["<its name>"]`` and adds the family's settings."""

    family: str


M = TypeVar("M", bound=ModelSection)


def _model_section(value: object) -> object:
    """``model:`` as given -> the registered family's config class instance (its validation errors
    keep their paths under ``model.``); instances pass through."""
    if not isinstance(value, dict):
        return value
    from medsynth.registry import family_names, get_family, load_object

    name = value.get("family", DEFAULT_FAMILY)
    if not isinstance(name, str) or name not in family_names():
        raise ValidationError.from_exception_data("model", [{
            "type": PydanticCustomError("unknown_family", "unknown model family '{family}' (known: {known})",
                                        {"family": str(name), "known": ", ".join(family_names())}),
            "loc": ("family",), "input": name,
        }])
    cls = load_object(get_family(name).config)
    if not (isinstance(cls, type) and issubclass(cls, ModelSection)):
        raise ConfigError(f"model family {name!r}: its config {get_family(name).config} is not a ModelSection")
    return cls.model_validate(value)


class GeneratorConfig(StrictModel):
    """SPADE-ResNet generator.

    channels: feature channels per resolution level, coarsest first (``[64, 32, 16]``: the noise map
        enters at 1/4 resolution with 64 channels; 2 upsamplings). The training size must be divisible
        by ``2 ** (len(channels) - 1)``.
    noise_channels: channels of the random latent noise map (at the coarsest level); one mask gives
        a different image for each noise draw (the seed picks one).
    spade_hidden: hidden channels of the SPADE modulation convolutions.
    """

    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [128, 64, 32])
    noise_channels: int = Field(default=16, ge=1)
    spade_hidden: int = Field(default=64, gt=0)


class DiscriminatorConfig(StrictModel):
    """MONAI MultiScalePatchDiscriminator that sees image and one-hot mask concatenated."""

    num_d: int = Field(default=2, ge=1)
    num_layers: int = Field(default=3, ge=1)
    channels: int = Field(default=64, gt=0)


class PerceptualConfig(StrictModel):
    """Optional perceptual loss from a LOCAL weights file (nothing is downloaded).

    weight: 0 turns it off (default).
    network: MONAI ResNet depth whose weights ``weights_path`` holds (e.g. MedicalNet resnet10 in 3D,
        a RadImageNet/ImageNet resnet50 in 2D), spatial dims as the run's.
    weights_path: ``.safetensors`` or ``.pt`` state dict (read with weights_only=True).
    """

    weight: float = Field(default=0.0, ge=0)
    network: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    weights_path: Path | None = None

    @model_validator(mode="after")
    def _need_file(self) -> PerceptualConfig:
        if self.weight > 0 and self.weights_path is None:
            raise ValueError("weight > 0 needs weights_path (a local weights file; nothing is downloaded)")
        return self


class GanLossConfig(StrictModel):
    """Generator objective: adversarial + feature matching + L1 to the paired real image (+ perceptual)."""

    adversarial: Literal["hinge", "lsgan"] = "hinge"
    adversarial_weight: float = Field(default=1.0, ge=0)
    feature_matching_weight: float = Field(default=10.0, ge=0)
    l1_weight: float = Field(default=10.0, ge=0)
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)


class GanModelConfig(ModelSection):
    """Mask-conditioned GAN (SPADE generator + multi-scale patch discriminator)."""

    family: Literal["gan"] = "gan"
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    loss: GanLossConfig = Field(default_factory=GanLossConfig)


def _check_levels(section: LdmAutoencoderConfig | LdmDiffusionConfig) -> None:
    """channels divisible by norm_num_groups; attention_levels (when given) one per level."""
    bad = [c for c in section.channels if c % section.norm_num_groups]
    if bad:
        raise ValueError(f"channels {bad} are not multiples of norm_num_groups={section.norm_num_groups}")
    levels = section.attention_levels
    if levels is not None and len(levels) != len(section.channels):
        raise ValueError(
            f"attention_levels needs one value per level ({len(section.channels)}), got {len(levels)}"
        )


class LdmAutoencoderConfig(StrictModel):
    """Stage 1: MONAI AutoencoderKL trained with L1 + KL + SSIM + patch adversarial (+ perceptual).

    channels: feature channels per level; the image is downsampled ``2 ** (len(channels) - 1)``
        times per axis (data.size must be divisible by it).
    attention_levels: one bool per level (None: no attention); nonlocal_attn: the attention block at
        the bottom of encoder and decoder (memory grows with the latent voxels squared).
    latent_channels: channels of the latent the diffusion model works on.
    use_checkpoint: activation checkpointing (less memory, ~1.4x the time).
    lr: the autoencoder's learning rate (the patch discriminator uses training.lr_d).
    max_steps: this stage's steps (None: training.max_steps); training.max_steps caps it either way.
    batch_size: this stage's batch (None: training.batch_size).
    kl_weight / ssim_weight / adv_weight: loss weights of the KL term, (1 - SSIM) and the
        least-squares patch adversarial term; adv_start: steps before the adversarial term starts.
    disc_channels / disc_layers: MONAI PatchDiscriminator size.
    perceptual: optional perceptual loss from a local weights file (off by default).
    decode_tile: latent tile edge for sliding-window decoding at sampling time (None: whole).
    """

    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32, 64, 64], min_length=2)
    num_res_blocks: int = Field(default=1, ge=1)
    attention_levels: list[bool] | None = None
    latent_channels: int = Field(default=3, ge=1)
    norm_num_groups: int = Field(default=16, ge=1)
    nonlocal_attn: bool = False
    use_checkpoint: bool = False
    lr: float = Field(default=1e-4, gt=0)
    max_steps: int | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, gt=0)
    kl_weight: float = Field(default=1e-6, ge=0)
    ssim_weight: float = Field(default=0.5, ge=0)
    adv_weight: float = Field(default=0.01, ge=0)
    adv_start: int = Field(default=0, ge=0)
    disc_channels: int = Field(default=32, gt=0)
    disc_layers: int = Field(default=3, ge=1)
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)
    decode_tile: int | None = Field(default=None, ge=2)
    decode_overlap: float = Field(default=0.25, ge=0, lt=1)

    @model_validator(mode="after")
    def _levels(self) -> LdmAutoencoderConfig:
        _check_levels(self)
        return self


class LdmDiffusionConfig(StrictModel):
    """Stage 2: MONAI diffusion UNet on scaled latents, conditioned on the one-hot label map.

    conditioning: ``concat`` (mask resampled to the latent grid, concatenated to the input),
        ``controlnet`` (MONAI ControlNet over the base UNet, reading the full-resolution mask) or
        ``spade`` (MONAI SPADEDiffusionModelUNet); mask_resample: ``area`` (label fractions) or
        ``nearest`` for concat/spade.
    Class conditioning (MONAI's class embedding) is on when data.class_key gives more than one class.
    cond_dropout: probability of training a sample with its conditions dropped (zero mask, null
        class), which enables classifier-free ``guidance`` (> 1 strengthens the conditions).
    scheduler: the noise process trained on: ``rflow`` (rectified flow, velocity prediction) or
        ``ddpm`` (with ``prediction_type``).
    sampler / sample_steps / guidance: sampling defaults (each overridable at sampling time).
    max_steps / batch_size: this stage's steps and batch (None: training.max_steps / batch_size);
        training.max_steps caps the steps either way. The UNet's learning rate is training.lr.
    num_head_channels: channels per attention head, one value or one per level (MONAI's convention;
        a level narrower than the value gets one head; the value of a level without attention is unused
        except at the last level, whose mid block always attends).
    spade_channels / controlnet_channels: hidden channels of the SPADE modulation / the first
        ControlNet embedding level.
    """

    channels: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    num_res_blocks: int = Field(default=1, ge=1)
    attention_levels: list[bool] | None = None
    num_head_channels: int | list[Annotated[int, Field(ge=0)]] = Field(default=32)
    norm_num_groups: int = Field(default=16, ge=1)
    conditioning: Literal["concat", "controlnet", "spade"] = "concat"
    mask_resample: Literal["area", "nearest"] = "area"
    cond_dropout: float = Field(default=0.1, ge=0, le=1)
    scheduler: Literal["ddpm", "rflow"] = "rflow"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(default=1000, ge=2)
    sampler: Literal["ddpm", "ddim", "rflow"] = "rflow"
    sample_steps: int = Field(default=30, ge=1)
    guidance: float = Field(default=1.0, ge=0)
    max_steps: int | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, gt=0)
    spade_channels: int = Field(default=64, gt=0)
    controlnet_channels: int = Field(default=16, gt=0)

    def head_channels(self) -> list[int]:
        """Channels per attention head at each level (an int applies to all, capped at the level's width)."""
        h = self.num_head_channels
        return [min(h, c) for c in self.channels] if isinstance(h, int) else list(h)

    @model_validator(mode="after")
    def _check(self) -> LdmDiffusionConfig:
        _check_levels(self)
        heads = self.head_channels()
        if len(heads) != len(self.channels):
            raise ValueError(f"num_head_channels needs one value per level ({len(self.channels)}), got {len(heads)}")
        levels = self.attention_levels or [False] * len(self.channels)
        for i, (c, h) in enumerate(zip(self.channels, heads)):
            if (levels[i] or i == len(heads) - 1) and (h <= 0 or c % h):
                raise ValueError(f"level {i}: {c} channels are not a multiple of num_head_channels {h}")
        if self.scheduler == "ddpm" and self.sampler == "rflow":
            raise ValueError("sampler 'rflow' needs scheduler 'rflow' (a ddpm-trained model samples with ddpm or ddim)")
        if self.sample_steps > self.num_train_timesteps:
            raise ValueError(f"sample_steps {self.sample_steps} exceeds num_train_timesteps {self.num_train_timesteps}")
        return self


class LdmModelConfig(ModelSection):
    """Latent diffusion model: stage 1 ``autoencoder`` then stage 2 ``diffusion``.

    use_flash_attention: PyTorch SDPA in MONAI's attention blocks (auto: on for CUDA).
    """

    family: Literal["ldm"] = "ldm"
    autoencoder: LdmAutoencoderConfig = Field(default_factory=LdmAutoencoderConfig)
    diffusion: LdmDiffusionConfig = Field(default_factory=LdmDiffusionConfig)
    use_flash_attention: Literal["auto", True, False] = "auto"


# ---------------------------------------------------------------------------- optimiser / training


class OptimizerConfig(StrictModel):
    """Adam(W) settings shared by a family's optimisers (learning rates live in ``training``)."""

    name: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class TrainingConfig(StrictModel):
    """The loop.

    max_steps: optimisation steps in total (a resumed run continues up to it).
    batch_size: samples per step per process (a torchrun job of P processes uses P * batch_size).
    lr: learning rate of the main network (GAN generator, diffusion UNet); lr_d: of a discriminator.
    amp: bf16 autocast on CUDA (ignored on CPU, where bf16 is slow).
    ema: decay of the exponential moving average of the main network's weights; null turns it off
        (the export then takes the raw weights).
    checkpoint_every / log_every / preview_every: intervals in steps (0 turns previews off).
    keep_last: checkpoints kept (older ones are deleted after a new one is written).
    seed: every random draw (initial weights, data order, crops, noise) derives from it.
    workers: DataLoader worker processes (0: load in the main process).
    device: ``auto`` picks CUDA when present.
    deterministic: ``torch.use_deterministic_algorithms`` during training (CPU always; CUDA when set).
    """

    max_steps: int = Field(default=1000, ge=0)
    batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    lr_d: float = Field(default=2e-4, gt=0)
    amp: bool = True
    ema: float | None = Field(default=0.999, gt=0, lt=1)
    checkpoint_every: int = Field(default=500, gt=0)
    keep_last: int = Field(default=3, gt=0)
    log_every: int = Field(default=10, gt=0)
    preview_every: int = Field(default=500, ge=0)
    seed: int = Field(default=0, ge=0)
    workers: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False


class Config(StrictModel):
    """A whole recipe."""

    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: SerializeAsAny[ModelSection] = Field(default_factory=GanModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _family_section(cls, value: object) -> object:
        return _model_section(value)

    def model_as(self, cls: type[M]) -> M:
        """``self.model`` as the family config class ``cls`` (ConfigError for another family's)."""
        if not isinstance(self.model, cls):
            raise ConfigError(f"model.family: {self.model.family!r} where a {cls.__name__} is needed")
        return self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (paths as strings)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- loading


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One message listing every error with its dotted field path and the offending value."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = err.get("input")
        quiet = err["type"] in ("missing", "extra_forbidden", "unknown_family") or isinstance(got, dict)
        shown = "" if quiet else f" (got {got!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}{shown}")
    n = len(lines)
    return f"{source}: {n} invalid setting{'s' if n != 1 else ''}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.max_steps=20"`` -> (["training", "max_steps"], 20); value parsed as YAML."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. training.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating missing sections); returns ``data``."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict; raises ConfigError listing every bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


UNSET = "<unset>"


def changed_settings(old: dict[str, Any], new: dict[str, Any],
                     ignore: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two nested
    settings dicts (a key missing on one side shows as ``"<unset>"``), sorted by key; keys in
    ``ignore`` are skipped. Used to refuse a resume whose settings changed."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(old), flat(new)
    return [(key, a.get(key, UNSET), b.get(key, UNSET)) for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key, UNSET) != b.get(key, UNSET)]


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ConfigError otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None), apply ``key=value``
    overrides, validate. Raises :class:`ConfigError` for an unreadable file or any bad field."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        data = read_yaml_mapping(path)
    from_file = (data.get("data") or {}).get("manifest") if isinstance(data.get("data"), dict) else None
    data = apply_overrides(data, list(overrides or []))
    cfg = validate_config(data, source)
    manifest = cfg.data.manifest
    if manifest is not None and not manifest.is_absolute():
        # a manifest path written in a recipe is relative to the recipe's folder; one given on the
        # command line is relative to the working directory
        base = Path(path).parent if path is not None and str(manifest) == str(from_file) else Path.cwd()
        cfg.data.manifest = (base / manifest).resolve()
    return cfg
