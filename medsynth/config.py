"""Training recipes: pydantic models for the YAML configs, and :func:`load_config`.

A recipe has four sections::

    data:       what to train on and how to present it (manifest, 2D/3D, slice axis, spacing,
                patch size, intensity normalisation, optional class conditioning)
    model:      the model family and its networks: ``model.family`` names a family of
                :mod:`medsynth.registry`, whose config class validates the section
                (``gan`` -> :class:`GanModelConfig`, ``ldm`` -> :class:`LdmModelConfig`)
    optimizer:  optimiser settings shared by a family's networks (learning rates are in ``training``)
    training:   the loop (steps, batch, learning rates, AMP, EMA, intervals, seed, workers)

Every field carries a ``description`` (its unit and effect); ``docs/recipes.md`` is generated from
them by :mod:`medsynth.recipe_docs`. Every model has ``extra="forbid"``; a bad recipe raises one
:class:`~medsynth.errors.ConfigError` listing every problem with its field path
(``training.batch_size: Input should be greater than 0 (got -1)``).

``load_config(path, overrides)`` applies ``--set key=value`` overrides before validation: the key is
a dotted path (``training.max_steps``), the value is parsed as a YAML scalar or flow collection
(``8`` -> int, ``1e-4`` -> float, ``[32, 32]`` -> list, ``null`` -> None).

A family's model section subclasses :class:`ModelSection` with ``family: Literal["<name>"]`` and is
registered in :mod:`medsynth.registry`; nothing here lists the families.
"""

from __future__ import annotations

import reprlib
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
from medsynth.safe_yaml import load_yaml, read_yaml_file
from medsynth.seeds import SEED_MAX

DEFAULT_MRI_PERCENTILES = (0.5, 99.5)
#: upper bounds of the sizes a recipe may ask for (no machine holds more; a typo such as an extra
#: zero is then an error naming the field, before anything is allocated)
MAX_BATCH_SIZE = 4096
MAX_SIZE = 4096  # voxels per axis of data.size
MAX_CHANNELS = 2048  # feature channels of one network level
MAX_LEVELS = 8  # resolution levels of one network, or blocks / layers repeated per level
#: the family of a recipe whose ``model`` section does not name one
DEFAULT_FAMILY = "gan"


class StrictModel(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------- data


class DataConfig(StrictModel):
    """What to train on and how to present it to the model."""

    manifest: Path | None = Field(default=None, description=(
        "The dataset: an MSD dataset.json, a CSV manifest or an nnU-Net raw folder. A relative path in a "
        "recipe is relative to the recipe's folder; `--data` on the command line overrides it."))
    dim: Literal[2, 3] = Field(default=3, description=(
        "Spatial dimensions of the model. 2: trains on 2D images, or on slices drawn from 3D volumes along "
        "`slice_axis`, and generates a 3D mask slice by slice (no continuity between slices); 3: trains on "
        "3D patches and generates whole volumes (3D data only)."))
    slice_axis: Literal[0, 1, 2] = Field(default=2, description=(
        "dim 2 with 3D volumes: the volume axis (file index order) that training slices are drawn along and "
        "that generation steps through; 2 is axial for RAS volumes. Ignored otherwise."))
    spacing: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, description=(
        "Target voxel size in mm, one value per volume axis (3 for 3D volumes, 2 for 2D images): every volume "
        "is resampled to it before training (images linearly, labels nearest), and a mask given at sampling "
        "is resampled to it and the image back. null keeps each volume's own grid."))
    size: list[Annotated[int, Field(gt=0, le=MAX_SIZE)]] = Field(default_factory=lambda: [32, 32, 32], description=(
        "Training crop in voxels: a random patch (dim 3, 3 values) or a random crop of a slice (dim 2, 2 "
        "values), drawn anew at every step; smaller volumes are padded with background. Only training uses "
        "it: generation is fully convolutional and works on the whole mask. Each value must be a multiple of "
        "the model's downsampling factor; memory and time per step grow with the product of the values."))
    ct_window: tuple[float, float] | None = Field(default=None, description=(
        "[lo, hi] in the dataset's units (HU for CT): intensities are clipped to it and mapped linearly to "
        "[0, 1], and generated images mapped back. Set either this or mri_percentiles."))
    mri_percentiles: tuple[float, float] | None = Field(default=None, description=(
        "[lo, hi] percentiles (0-100) of the training set's intensities, per channel, mapped to [0, 1] "
        "(values below lo are clipped; above hi see upper_tail) and generated images mapped back. Without "
        "ct_window it defaults to [0.5, 99.5]."))
    upper_tail: Literal["clip", "soft"] = Field(default="clip", description=(
        "mri_percentiles only: what happens above the upper percentile. `clip` maps the range to [0, 1] and "
        "clips (every value above the percentile becomes one: a lesion brighter than the brightest tissue is "
        "lost); `soft` maps the range to [0, 0.8] and compresses brighter values smoothly towards 1 "
        "(invertible), so a bright lesion or vessel is learned and generated with its own intensity. On in "
        "the GPU recipes; the tiny and small CPU recipes keep `clip`, their calibration was measured with it."))
    class_key: str | None = Field(default=None, description=(
        "A per-case manifest field (e.g. `modality`) whose value conditions the model; sampling then needs "
        "`--class VALUE`. null: no class conditioning."))
    classes: list[str] | None = Field(default=None, description=(
        "The values of class_key in condition order; null takes the sorted distinct values of the data."))
    foreground_slices: bool = Field(default=True, description=(
        "dim 2 with 3D volumes: draw training slices only among those holding a foreground label (when a "
        "volume has any), so empty slices beyond the anatomy are not learned; false draws every slice. "
        "Ignored otherwise."))

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

    family: str = Field(description="A registered model family (`gan`, `ldm`, ...); it picks the section's fields.")


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
    """SPADE-ResNet generator."""

    channels: list[Annotated[int, Field(gt=0, le=MAX_CHANNELS)]] = Field(default_factory=lambda: [128, 64, 32],
                                                                        max_length=MAX_LEVELS, description=(
        "Feature channels per resolution level, coarsest first: [64, 32, 16] starts from a noise map at 1/4 "
        "of the image size with 64 channels and upsamples twice. The downsampling factor is 2 ** (levels - 1) "
        "and data.size must be a multiple of it; more or wider levels: more capacity, memory and time."))
    noise_channels: int = Field(default=16, ge=1, le=MAX_CHANNELS, description=(
        "Channels of the random noise map at the coarsest level; the seed draws it, so one mask gives a "
        "different image for each seed."))
    spade_hidden: int = Field(default=64, gt=0, le=MAX_CHANNELS, description=(
        "Hidden channels of each SPADE block's modulation convolutions (the mask -> feature modulation)."))
    fill: Literal["none", "input", "residual"] = Field(default="residual", description=(
        "The label-mean fill (each label painted with its mean training intensity, stored in the run card): "
        "`residual` gives it to the generator as input channels and adds the generator's output to it, so a "
        "fresh model paints the fill and per-label intensities match the training set by construction; "
        "`input` gives it as input channels only; `none` is the plain SPADE generator."))
    appearance: Literal["pooled", "per_case"] = Field(default="pooled", description=(
        "Which label means the fill paints: `pooled` (the whole training set's, one appearance for every "
        "image) or `per_case` (each training image starts from its own case's per-label means; at inference "
        "the seed draws a label-mean vector from the training cases' distribution, or `generate(..., "
        "appearance=...)` picks one): contrast that varies as the training cases' does. Needs a fill."))
    level_noise: bool = Field(default=False, description=(
        "Add a noise map at every generator level (StyleGAN-style, a learned scale per channel) besides the "
        "coarse noise map: texture that differs from seed to seed at every scale."))

    @model_validator(mode="after")
    def _appearance_needs_fill(self) -> GeneratorConfig:
        if self.appearance == "per_case" and self.fill == "none":
            raise ValueError("appearance: per_case needs a fill (fill: residual or input)")
        return self


class DiscriminatorConfig(StrictModel):
    """Multi-scale MONAI patch discriminator that sees image and one-hot mask concatenated."""

    num_d: int = Field(default=2, ge=1, le=MAX_LEVELS, description=(
        "Patch discriminators, each on the input average-pooled by a further factor of 2 (more: coarser "
        "structure is judged too)."))
    num_layers: int = Field(default=3, ge=1, le=MAX_LEVELS, description=(
        "Strided convolution layers per discriminator (more: a larger patch behind each decision)."))
    channels: int = Field(default=64, gt=0, le=MAX_CHANNELS, description="Feature channels of each discriminator's first layer.")
    spectral_norm: bool = Field(default=True, description=(
        "Spectral normalisation of every discriminator convolution (SPADE, pix2pixHD): keeps the "
        "discriminator's signal alive instead of saturating the hinge loss."))


class PerceptualConfig(StrictModel):
    """Optional perceptual loss from a LOCAL weights file (nothing is downloaded)."""

    weight: float = Field(default=0.0, ge=0, description=(
        "Weight of the perceptual term (a feature distance in a frozen pretrained ResNet); 0 turns it off. "
        "Needs weights_path."))
    network: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = Field(default="resnet10", description=(
        "MONAI ResNet depth whose weights weights_path holds (e.g. MedicalNet resnet10 in 3D, a "
        "RadImageNet/ImageNet resnet50 in 2D); its spatial dims are the run's."))
    weights_path: Path | None = Field(default=None, description=(
        "Local .safetensors or .pt state dict of `network`, read with weights_only=True (nothing is "
        "downloaded); needed when weight > 0."))

    @model_validator(mode="after")
    def _need_file(self) -> PerceptualConfig:
        if self.weight > 0 and self.weights_path is None:
            raise ValueError("weight > 0 needs weights_path (a local weights file; nothing is downloaded)")
        return self


#: ``model.flips`` of every family (the engine's :func:`~medsynth.training.engine.flip_batch`)
FLIPS_DESCRIPTION = (
    "Training augmentation: flip each training sample (image and mask together) along each spatial axis "
    "with probability 1/2. Helps a model trained on few cases generalise to unseen anatomy; leave it off "
    "when orientation carries meaning the masks do not (e.g. left/right-specific labels).")


class GanLossConfig(StrictModel):
    """Generator objective: adversarial + feature matching + L1 to the paired real image (+ perceptual)."""

    adversarial: Literal["hinge", "lsgan"] = Field(default="hinge", description=(
        "Adversarial loss of generator and discriminator: `hinge` (SPADE, pix2pixHD) or `lsgan` (least "
        "squares)."))
    adversarial_weight: float = Field(default=1.0, ge=0, description=(
        "Weight of the generator's adversarial term (realism as the discriminator judges it)."))
    feature_matching_weight: float = Field(default=10.0, ge=0, description=(
        "Weight of feature matching: L1 between the discriminator's intermediate features of generated and "
        "real images, summed over layers and averaged over scales (SPADE / pix2pixHD: 10; steadies training)."))
    l1_weight: float = Field(default=1.0, ge=0, description=(
        "Weight of the L1 distance between the generated image and the paired real image (intensities in "
        "[-1, 1]); higher ties images closer to the real ones and leaves less variety across seeds."))
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig, description=(
        "Optional perceptual loss (off by default)."))
    diversity_weight: float = Field(default=0.0, ge=0, description=(
        "Weight of the mode-seeking (diversity-sensitive) term (Mao et al. 2019): each step also generates "
        "the first half of the batch with a second noise draw and rewards |G(z1) - G(z2)| / |z1 - z2| (mean "
        "absolute differences), up to diversity_clamp; 0 turns it off (and saves that extra pass)."))
    diversity_clamp: float = Field(default=0.1, gt=0, description=(
        "The ratio |G(z1) - G(z2)| / |z1 - z2| above which the mode-seeking term stops rewarding variety "
        "(image in [-1, 1] units, noise standard normal): it bounds how much the seed may change an image."))


class GanModelConfig(ModelSection):
    """Mask-conditioned GAN (SPADE generator + multi-scale patch discriminator)."""

    family: Literal["gan"] = Field(default="gan", description=(
        "The model family: `gan` (one training stage; fast sampling)."))
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="The SPADE generator.")
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig, description=(
        "The multi-scale patch discriminator (training only)."))
    loss: GanLossConfig = Field(default_factory=GanLossConfig, description="The generator's objective.")
    flips: bool = Field(default=False, description=FLIPS_DESCRIPTION)


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
    """Stage 1: MONAI AutoencoderKL trained with L1 + KL + SSIM + patch adversarial (+ perceptual)."""

    channels: list[Annotated[int, Field(gt=0, le=MAX_CHANNELS)]] = Field(default_factory=lambda: [32, 64, 64], min_length=2,
                                                                        max_length=MAX_LEVELS, description=(
        "Feature channels per level; the image is downsampled 2 ** (levels - 1) times per axis into the "
        "latent, and data.size must be a multiple of that times the diffusion UNet's factor."))
    num_res_blocks: int = Field(default=1, ge=1, le=MAX_LEVELS, description="Residual blocks per level.")
    attention_levels: list[bool] | None = Field(default=None, description=(
        "One bool per level: self-attention at that level (memory grows with the square of its voxels); "
        "null: none."))
    latent_channels: int = Field(default=3, ge=1, le=MAX_CHANNELS, description=(
        "Channels of the latent the diffusion model works on (more: finer reconstructions, a harder "
        "diffusion task)."))
    norm_num_groups: int = Field(default=16, ge=1, description=(
        "Groups of the group normalisation; every value of channels must be a multiple of it."))
    nonlocal_attn: bool = Field(default=False, description=(
        "An attention block at the bottom of encoder and decoder (memory grows with the square of the "
        "latent voxels)."))
    use_checkpoint: bool = Field(default=False, description=(
        "Activation checkpointing: about 35% less memory for about 1.4x the time per step."))
    lr: float = Field(default=1e-4, gt=0, description=(
        "Learning rate of the autoencoder (its patch discriminator uses training.lr_d)."))
    max_steps: int | None = Field(default=None, ge=0, description=(
        "Steps of the autoencoder stage; null: training.max_steps. training.max_steps (and --max-steps) caps "
        "it either way: --max-steps N trains each stage at most N steps."))
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH_SIZE, description=(
        "Samples per step per process in this stage; null: training.batch_size."))
    kl_weight: float = Field(default=1e-6, ge=0, description=(
        "Weight of the KL divergence of the latent from a unit Gaussian (a smooth latent; too high blurs)."))
    ssim_weight: float = Field(default=0.5, ge=0, description="Weight of the structural term (1 - SSIM) beside L1.")
    adv_weight: float = Field(default=0.01, ge=0, description=(
        "Weight of the least-squares patch adversarial term (sharper reconstructions); 0: no discriminator."))
    adv_start: int = Field(default=0, ge=0, description=(
        "Steps of this stage before the adversarial term starts (a reconstruction warm-up)."))
    disc_channels: int = Field(default=32, gt=0, le=MAX_CHANNELS, description=(
        "Channels of the patch discriminator's first layer."))
    disc_layers: int = Field(default=3, ge=1, le=MAX_LEVELS, description="Strided layers of the patch discriminator.")
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig, description=(
        "Optional perceptual loss of the reconstruction (off by default)."))
    decode_tile: int | None = Field(default=None, ge=2, description=(
        "Sampling only: decode large masks in overlapping latent tiles of this edge (latent voxels), which "
        "bounds memory; null decodes the whole latent at once."))
    decode_overlap: float = Field(default=0.25, ge=0, lt=1, description=(
        "Sampling only: overlap of neighbouring decode tiles, a fraction of the tile edge."))
    target_psnr: float = Field(default=32.0, ge=0, description=(
        "Reconstruction quality (PSNR in dB, intensities in [0, 1], data range 1) the autoencoder should reach "
        "on the held-out slices or patches before the diffusion stage builds on it; measured at the end of the "
        "stage, logged in metrics.jsonl (`heldout_recon_psnr`) and the run card. Below it the diffusion stage does "
        "not start (`medsynth train --force` starts it anyway; the report says which); 0 turns the gate off."))

    @model_validator(mode="after")
    def _levels(self) -> LdmAutoencoderConfig:
        _check_levels(self)
        return self


class LatentCacheConfig(StrictModel):
    """Stage 2's cached latents: each training crop is encoded once by the frozen autoencoder and its
    posterior (mean and standard deviation) kept, so later steps on that crop skip the encoder."""

    store: Literal["off", "auto", "memory", "disk"] = Field(default="off", description=(
        "`off`: every step draws fresh crops (and flips) and encodes them (full online augmentation). "
        "`memory`, `disk` (RUN/latents/), or `auto` (memory when the cache fits memory_gib, else disk): stage 2 "
        "trains on a fixed pool of crops_per_case crops per case, each flipped once at random when model.flips "
        "is on, and encodes each crop the first time it is drawn. The cache is keyed by the autoencoder's "
        "weights, the data and the pool's settings, so a changed autoencoder or dataset never reuses it."))
    crops_per_case: int = Field(default=16, ge=1, le=4096, description=(
        "Crops (2D: slices or crops of slices) per training case in the pool; more: more variety, a larger "
        "cache and a longer first pass over it."))
    memory_gib: float = Field(default=2.0, gt=0, description=(
        "The most host memory the cache may hold per process, GiB (mean and standard deviation per crop, "
        "float32); `memory` refuses a pool larger than this, `auto` puts it on disk."))


class LdmDiffusionConfig(StrictModel):
    """Stage 2: MONAI diffusion UNet on scaled latents, conditioned on the one-hot label map (and on
    the class through MONAI's class embedding when data.class_key gives more than one class). The UNet's
    learning rate is training.lr."""

    channels: list[Annotated[int, Field(gt=0, le=MAX_CHANNELS)]] = Field(default_factory=lambda: [32, 64, 64], min_length=1,
                                                                        max_length=MAX_LEVELS, description=(
        "Feature channels per UNet level on the latent grid; each level after the first halves the latent "
        "resolution."))
    num_res_blocks: int = Field(default=1, ge=1, le=MAX_LEVELS, description="Residual blocks per level.")
    attention_levels: list[bool] | None = Field(default=None, description=(
        "One bool per level: self-attention at that level; null: none (the last level's middle block always "
        "attends)."))
    num_head_channels: int | list[Annotated[int, Field(ge=0)]] = Field(default=32, description=(
        "Channels per attention head: one value for every level, or one per level (MONAI's convention; a "
        "level narrower than the value gets one head; unused at levels without attention but the last)."))
    norm_num_groups: int = Field(default=16, ge=1, description=(
        "Groups of the group normalisation; every value of channels must be a multiple of it."))
    conditioning: Literal["concat", "controlnet", "spade"] = Field(default="concat", description=(
        "How the label map conditions the UNet: `concat` (resampled to the latent grid and concatenated to "
        "the input), `controlnet` (a MONAI ControlNet reading the full-resolution mask) or `spade` (MONAI's "
        "SPADE UNet, the mask modulating its normalisation)."))
    mask_resample: Literal["area", "nearest"] = Field(default="area", description=(
        "concat and spade: how the one-hot mask reaches the latent grid, `area` (label fractions per latent "
        "voxel) or `nearest` (the label at the voxel nearest each latent voxel's centre)."))
    cond_dropout: float = Field(default=0.1, ge=0, le=1, description=(
        "Probability of training a sample with its conditions dropped (empty mask, null class); above 0 it "
        "enables classifier-free guidance at sampling."))
    scheduler: Literal["ddpm", "rflow"] = Field(default="rflow", description=(
        "The noise process trained: `rflow` (rectified flow, velocity prediction) or `ddpm` (see "
        "prediction_type)."))
    prediction_type: Literal["epsilon", "v_prediction"] = Field(default="epsilon", description=(
        "scheduler ddpm: what the UNet predicts, the noise (`epsilon`) or the velocity (`v_prediction`)."))
    num_train_timesteps: int = Field(default=1000, ge=2, description="Timesteps of the noise process.")
    sampler: Literal["ddpm", "ddim", "rflow"] = Field(default="rflow", description=(
        "Default sampler: `rflow` (needs scheduler rflow), `ddim` or `ddpm`; `medsynth sample --sampler` "
        "overrides it."))
    sample_steps: int = Field(default=30, ge=1, description=(
        "Default sampling steps; time per image grows linearly with it. `--steps` overrides it."))
    guidance: float = Field(default=1.0, ge=0, description=(
        "Default classifier-free guidance scale: 1 none, above 1 follows the mask and class more strongly "
        "(needs cond_dropout > 0). `--guidance` overrides it."))
    max_steps: int | None = Field(default=None, ge=0, description=(
        "Steps of the diffusion stage; null: training.max_steps. training.max_steps (and --max-steps) caps "
        "it either way: --max-steps N trains each stage at most N steps."))
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH_SIZE, description=(
        "Samples per step per process in this stage; null: training.batch_size."))
    spade_channels: int = Field(default=64, gt=0, le=MAX_CHANNELS, description=(
        "conditioning spade: hidden channels of the SPADE modulation."))
    controlnet_channels: int = Field(default=16, gt=0, le=MAX_CHANNELS, description=(
        "conditioning controlnet: channels of the ControlNet's first mask-embedding level."))
    latent_cache: LatentCacheConfig = Field(default_factory=LatentCacheConfig, description=(
        "Cached latents: encode each training crop once instead of every step (see its fields)."))

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
    """Latent diffusion model: stage 1 ``autoencoder`` then stage 2 ``diffusion``."""

    family: Literal["ldm"] = Field(default="ldm", description=(
        "The model family: `ldm` (two training stages, autoencoder then diffusion; iterative sampling)."))
    autoencoder: LdmAutoencoderConfig = Field(default_factory=LdmAutoencoderConfig, description=(
        "Stage 1: the AutoencoderKL that maps images to latents and back."))
    diffusion: LdmDiffusionConfig = Field(default_factory=LdmDiffusionConfig, description=(
        "Stage 2: the mask-conditioned diffusion UNet on the latents."))
    use_flash_attention: Literal["auto", True, False] = Field(default="auto", description=(
        "PyTorch scaled-dot-product attention in MONAI's attention blocks: `auto` uses it on CUDA only."))
    fill: Literal["none", "condition", "residual"] = Field(default="residual", description=(
        "The label-mean fill (each label painted with its mean training intensity, stored in the run card): "
        "`condition` gives it to the diffusion UNet beside the mask; `residual` also makes the autoencoder "
        "code the difference between the image and the fill, and adds the fill back after decoding, so a "
        "model that has learned little still paints the training set's per-label intensities; `none`: off."))
    appearance: Literal["pooled", "per_case"] = Field(default="pooled", description=(
        "Which label means the fill paints (as model.generator.appearance for a GAN): `pooled` (the whole "
        "training set's) or `per_case` (each training image's fill, the autoencoder's residual and the UNet's "
        "fill channels come from its own case's per-label means; at inference the seed draws a label-mean "
        "vector from the training cases' distribution, or `generate(..., appearance=...)` picks one). Needs "
        "a fill."))
    flips: bool = Field(default=False, description=FLIPS_DESCRIPTION)

    @model_validator(mode="after")
    def _appearance_needs_fill(self) -> LdmModelConfig:
        if self.appearance == "per_case" and self.fill == "none":
            raise ValueError("appearance: per_case paints each case's own label means into the fill; set "
                             "fill: condition or residual")
        return self


# ---------------------------------------------------------------------------- optimiser / training


class OptimizerConfig(StrictModel):
    """Adam(W) settings shared by a family's optimisers (learning rates live in ``training``)."""

    name: Literal["adam", "adamw"] = Field(default="adam", description=(
        "`adam`, or `adamw` (weight decay decoupled from the gradient)."))
    betas: tuple[float, float] = Field(default=(0.5, 0.999), description=(
        "Adam's (beta1, beta2), each in [0, 1): decay rates of the gradient's running mean and square."))
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay per step; 0 turns it off.")
    grad_clip: float | None = Field(default=None, gt=0, description=(
        "Clip each optimiser's gradient norm to this value before its step; null: no clipping."))

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class TrainingConfig(StrictModel):
    """The training loop."""

    max_steps: int = Field(default=1000, ge=0, description=(
        "Optimisation steps in total; a resumed run continues up to it. For a staged family (ldm) it caps "
        "each stage, and so does `--max-steps`."))
    batch_size: int = Field(default=4, gt=0, le=MAX_BATCH_SIZE, description=(
        "Samples per step per process; a torchrun job of P processes trains on P x batch_size."))
    lr: float = Field(default=2e-4, gt=0, description=(
        "Learning rate of the main network (the GAN generator, the diffusion UNet)."))
    lr_d: float = Field(default=2e-4, gt=0, description=(
        "Learning rate of the discriminators (the GAN's, the LDM autoencoder's patch discriminator)."))
    amp: bool = Field(default=True, description=(
        "bf16 autocast on CUDA (faster, less activation memory); ignored on the CPU, where bf16 is slow."))
    channels_last: bool = Field(default=False, description=(
        "Channels-last memory format (channels_last_3d for 3D) for the trained networks and the batch: faster "
        "convolutions on recent GPUs, the same results up to float rounding. Off until measured on a GPU "
        "(benchmarks/device.sh)."))
    compile: bool = Field(default=False, description=(
        "torch.compile the networks a step trains (CUDA; the first steps take minutes to compile, and each new "
        "input shape compiles again). Off until measured on a GPU (benchmarks/device.sh)."))
    ema: float | None = Field(default=0.999, gt=0, lt=1, description=(
        "Decay of the exponential moving average of the main network's weights, which previews, export and "
        "sampling use (0.999 averages over about the last 1000 steps); null: off, the raw weights are used."))
    checkpoint_every: int = Field(default=500, gt=0, description=(
        "Steps between checkpoints; each also rewrites RUN/report.md and RUN/curves.png. The last step "
        "always writes one."))
    keep_last: int = Field(default=3, gt=0, description=(
        "Checkpoints kept per stage; older ones are deleted once a newer one is written."))
    log_every: int = Field(default=10, gt=0, description=(
        "Steps between records of RUN/metrics.jsonl; a record holds each loss averaged over the steps since "
        "the previous record (the numbers the progress line and the final summary show)."))
    preview_every: int = Field(default=500, ge=0, description=(
        "Steps between evaluations with a preview image (RUN/previews/, full-size slices of a few training "
        "cases; 3D latent diffusion: the training crops); 0: no previews (evaluations still run at the first and "
        "last step)."))
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description=(
        "Seeds every random draw (initial weights, data order, crops, noise): the same recipe and seed "
        "train the same run, bit for bit on the CPU."))
    workers: int = Field(default=0, ge=0, description=(
        "DataLoader worker processes preparing batches (0: the main process); results do not depend on it."))
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=(
        "`auto` (CUDA when available), `cpu` or `cuda`."))
    deterministic: bool = Field(default=False, description=(
        "Deterministic torch algorithms on CUDA too (slower); the CPU always uses them."))
    threads: int = Field(default=0, ge=0, description=(
        "CPU threads torch uses in each training process; 0: auto (OMP_NUM_THREADS when set, else the CPU "
        "cores this process may run on, at most 32). Set your share on a shared machine; the number is "
        "printed at the start ('using N CPU threads')."))


class Config(StrictModel):
    """A whole recipe."""

    name: str = Field(default="run", description="The recipe's name, shown in the run's report.")
    data: DataConfig = Field(default_factory=DataConfig, description="What to train on and how to present it.")
    model: SerializeAsAny[ModelSection] = Field(default_factory=GanModelConfig, description=(
        "The model family (`model.family`) and its networks."))
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description=(
        "Optimiser settings shared by the family's networks."))
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The training loop.")

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


#: the most characters of a value an error message shows
SHOWN_CHARS = 80
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 6, 6, 4, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = SHOWN_CHARS, SHOWN_CHARS, 40


def short_text(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = SHOWN_CHARS) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without the repr of anything large:
    at most 6 items of a list and 2 levels of nesting are looked at, and an integer of more than
    256 bits is shown by its size (so a YAML alias bomb or a huge number costs nothing to show)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of {value.bit_length()} bits>"
    return short_text(_SHORT.repr(value), limit)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One message listing every error with its dotted field path and the offending value (one line when
    there is one error)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = err.get("input")
        quiet = err["type"] in ("missing", "extra_forbidden", "unknown_family") or isinstance(got, dict)
        shown = "" if quiet else f" (got {short_repr(got)})"
        lines.append(f"  {short_text(loc, SHOWN_CHARS) or '(top level)'}: {short_text(msg, 4 * SHOWN_CHARS)}{shown}")
    n = len(lines)
    if n == 1:  # one problem: one line
        return f"{source}: invalid setting {lines[0].strip()}"
    return f"{source}: {n} invalid settings:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.max_steps=20"`` -> (["training", "max_steps"], 20); value parsed as YAML
    (:func:`medsynth.safe_yaml.load_yaml`: safe tags only, aliases bounded)."""
    shown = short_repr(item)
    if "=" not in item:
        raise ConfigError(f"--set {shown}: expected key=value (e.g. training.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {shown}: empty key")
    value = load_yaml(raw, f"--set {shown}") if raw.strip() else None
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
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ConfigError otherwise
    (read by :func:`medsynth.safe_yaml.read_yaml_file`: safe tags only, size and aliases bounded)."""
    path = Path(path)
    loaded = read_yaml_file(path)
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


# ---------------------------------------------------------------------------- memory

#: bytes per trained float32 parameter: the weight, its gradient and Adam's two moments
_BYTES_PER_PARAMETER = 16
#: bytes per activation kept for the backward pass: the float32 value and its gradient
_BYTES_PER_ACTIVATION = 8


def network_widths(node: object) -> list[list[int]]:
    """Every ``channels`` setting under a model section: one list of level widths per network."""
    found: list[list[int]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "channels" and isinstance(value, list) and all(isinstance(c, int) for c in value):
                found.append([int(c) for c in value])
            elif key == "channels" and isinstance(value, int) and not isinstance(value, bool):
                found.append([int(value)])
            else:
                found.extend(network_widths(value))
    return found


def _batch_sizes(node: object) -> list[int]:
    """Every non-null ``batch_size`` under ``node`` (the stages' own batch sizes)."""
    if not isinstance(node, dict):
        return []
    found = [int(v) for k, v in node.items() if k == "batch_size" and isinstance(v, int) and not isinstance(v, bool)]
    return found + [b for v in node.values() for b in _batch_sizes(v)]


def memory_estimate(cfg: Config) -> tuple[int, int]:
    """``(bytes, parameters)``: a LOWER bound of the memory training ``cfg`` needs, from the recipe alone.

    Parameters: for every network (each ``channels`` setting of the model section) one
    ``3**dim``-tap convolution ``c -> c`` per level of width ``c``, each trained float32 parameter
    taking 16 bytes (weight, gradient, two Adam moments). Activations: per sample of the smallest
    batch any stage uses, one float32 feature map of the narrowest level over the whole training crop
    (``data.size``), kept with its gradient (8 bytes per value). Real networks hold many such maps, so
    a recipe above this bound cannot train on the device; one below it may still not fit."""
    model = cfg.model.model_dump(mode="json")
    widths = network_widths(model)
    taps = 3 ** cfg.data.dim
    parameters = sum(taps * c * c for net in widths for c in net)
    batch = min([cfg.training.batch_size, *_batch_sizes(model)])
    voxels = 1
    for s in cfg.data.size:
        voxels *= int(s)
    narrowest = min((c for net in widths for c in net), default=1)
    activations = batch * voxels * narrowest
    return parameters * _BYTES_PER_PARAMETER + activations * _BYTES_PER_ACTIVATION, parameters
