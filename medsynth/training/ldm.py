"""The latent diffusion family: two stages in one run, each its own loop of the engine.

With ``model.fill: residual`` (the default) the autoencoder codes ``image - fill`` (the label-mean
fill of the image's mask, :func:`medsynth.models.conditioning.fill_image`) and every image below is
``fill + decode(z)``; with ``condition`` or ``residual`` the UNet also reads the fill beside the mask.

Stage ``autoencoder`` (MONAI AutoencoderKL + PatchDiscriminator), images in [0, 1]:
  1. reconstruction of ``z = mu + sigma * eps`` (eps from ``rt.generator(step)``);
     loss = L1 + ssim_weight * (1 - SSIM) + kl_weight * KL (+ perceptual) (+ adv_weight * least-squares
     patch adversarial term from step ``adv_start`` on); Adam step on the autoencoder.
  2. from ``adv_start`` on: the patch discriminator on real vs detached reconstructions.
  At the end, the posterior-mean reconstruction of held-out slices or patches
  (:func:`medsynth.training.yardstick.evaluation_items`) is scored (``heldout_recon_psnr`` /
  ``heldout_recon_ssim``: a ``{"kind": "heldout"}`` line of ``metrics.jsonl`` and facts of the run
  card's ``model``), with a warning when the PSNR is below
  ``model.autoencoder.target_psnr``: the diffusion stage cannot make images better than that.
  The quality gate (:func:`check_autoencoder_gate`): the diffusion stage does not start on such an
  autoencoder unless ``force`` (``medsynth train --force``); a ``{"kind": "gate"}`` line of
  ``metrics.jsonl`` records the verdict and the run report says it.

Stage ``diffusion`` (the autoencoder frozen, read from the newest autoencoder checkpoint):
  1. latents ``z0 = scale * (mu + sigma * eps)``; ``scale = 1 / std`` of the first stage-2 batch's
     latents (over all ranks), kept in the checkpoints, the model card and the weights file. With
     ``model.diffusion.latent_cache`` the stage trains on a fixed pool of crops and each crop's
     ``(mu, sigma)`` is encoded once (:mod:`medsynth.training.latent_cache`); ``model.flips`` then
     flips each pool crop once, and ``store: off`` keeps fresh crops and flips every step;
  2. condition dropout (zero mask, null class) with probability ``cond_dropout`` for guidance;
  3. noise and timestep from the run's generators, ``z_t = process.add_noise(z0, noise, t)``;
     MSE of the UNet's prediction to the process's target; Adam step; EMA update.

:func:`train_ldm` runs the stages in order (or one). A run whose autoencoder changed after its
diffusion checkpoints were written (a finished run resumed with a larger ``--max-steps``) retrains
the diffusion stage from its seed, so 10 steps resumed to 20 equal 20 straight.

Export (end of the diffusion stage): ``RUN/model.safetensors`` holds ``autoencoder.*`` and the EMA
``unet.*`` weights; the model card's ``model`` entry holds the scale factor, conditioning, noise
process and sampler defaults (read back by :func:`medsynth.synthesis.ldm.load_ldm_backend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.config import Config, LdmAutoencoderConfig, LdmDiffusionConfig, LdmModelConfig
from medsynth.data.loader import POOL_BASE
from medsynth.diffusion import Condition, Denoiser, NoiseProcess, make_process, sample_latents, size_multiple, use_flash
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.models.appearance import AppearanceDistribution, case_mean_table
from medsynth.models.autoencoder import build_autoencoder, build_discriminator, downsample_factor, encode, randn_like
from medsynth.models.conditioning import fill_image, fill_means_of
from medsynth.models.diffusion import MaskConditionedUNet
from medsynth.registry import get_family
from medsynth.runcard import WEIGHTS_FILE
from medsynth.seeds import Stream, derive_seed
from medsynth.training.engine import FLIP_STREAM, Batch, FamilyBase, Runtime, TrainResult, checkpoint_dir, flip_batch
from medsynth.training.latent_cache import CACHE_DIR, LatentCache, cache_fingerprint, plan_store
from medsynth.training.report import read_metrics, write_report

if TYPE_CHECKING:  # pragma: no cover
    from monai.networks.nets import AutoencoderKL

    from medsynth.data.loader import DataInfo

STAGES: tuple[str, ...] = get_family("ldm").stages

EVAL_LEVELS = 8  # timesteps per item in the diffusion stage's evaluation
# generator streams of one step (rt.generator(step, stream)), distinct across the two stages
_AE_EPS, _ENCODE, _NOISE, _TIME, _DROP = 0, 1, 2, 3, 4  # (training flips: engine.FLIP_STREAM, 9)


# ---------------------------------------------------------------------------- losses


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``1 - SSIM`` (differentiable), images ``(N, C, *spatial)``.

    The Wang et al. (2004) setting of :mod:`medsynth.evaluation.metrics` (Gaussian sigma 1.5 taps
    from its ``gaussian_window``, K1 0.01, K2 0.03, valid region) as separable float32 convolutions;
    the window shrinks to fit sides shorter than 11. (The metric itself detaches its inputs and works
    in float64, so it cannot be a training loss.)
    """
    from medsynth.evaluation.metrics import gaussian_window

    sd = x.ndim - 2
    radius = min(5, (min(x.shape[2:]) - 1) // 2)
    taps = torch.as_tensor(gaussian_window(truncate=radius / 1.5 + 1e-9), dtype=torch.float32, device=x.device)
    x, y = x.float(), y.float()
    c = x.shape[1]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    conv = F.conv2d if sd == 2 else F.conv3d
    for axis in range(sd):
        shape = [5 * c, 1] + [taps.numel() if a == axis else 1 for a in range(sd)]
        stack = conv(stack, taps.reshape([1, 1] + shape[2:]).expand(shape), groups=5 * c)
    ux, uy, uxx, uyy, uxy = stack.split(c, dim=1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return 1.0 - s.mean()


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels, mean over the batch."""
    per = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2 + 1e-12) - 1.0)
    return per.flatten(1).sum(1).mean()


def denoising_loss(net: Denoiser, process: NoiseProcess, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   mask: torch.Tensor, labels: torch.Tensor | None,
                   autocast: contextlib.AbstractContextManager[object] | None = None,
                   label_means: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between ``net(z_t, t, mask, labels)`` and the process's target, ``z_t = add_noise(z0, noise, t)``.

    z0, noise: ``(N, Cz, *latent)``; t: ``(N,)``; mask: one-hot ``(N, L, *image)``; autocast: a context
    for the forward (e.g. bf16 on CUDA) or None; label_means: ``(N, C, L)`` per-case fill means (None:
    the pooled ones).
    """
    z_t = process.add_noise(z0, noise, t)
    with autocast if autocast is not None else contextlib.nullcontext():
        pred = net(z_t, t, mask, labels) if label_means is None else net(z_t, t, mask, labels, label_means=label_means)
    return F.mse_loss(pred.float(), process.target(z0, noise, t))


def lsgan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares patch adversarial loss (MONAI ``PatchAdversarialLoss(criterion="least_squares")``)."""
    target = 1.0 if real else 0.0
    return ((logits.float() - target) ** 2).mean()


# ---------------------------------------------------------------------------- helpers


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes (the identity of an autoencoder's weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").reshape(-1)  # logical order, whatever the memory format
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stage_section(config: Config, stage: str) -> LdmAutoencoderConfig | LdmDiffusionConfig:
    model = config.model_as(LdmModelConfig)
    return model.autoencoder if stage == "autoencoder" else model.diffusion


def stage_steps(config: Config, stage: str) -> int:
    """Steps of ``stage``: its own ``max_steps`` when set, capped by ``training.max_steps``."""
    own = _stage_section(config, stage).max_steps
    cap = config.training.max_steps
    return cap if own is None else min(own, cap)


def stage_config(config: Config, stage: str) -> Config:
    """The recipe one stage trains with: ``training.batch_size`` replaced by the stage's own
    ``batch_size`` when it sets one (the stage's checkpoints and resume checks hold this config)."""
    own = _stage_section(config, stage).batch_size
    if own is None or own == config.training.batch_size:
        return config
    cfg = config.model_copy(deep=True)
    cfg.training.batch_size = own
    return cfg


def check_sizes(config: Config, size: list[int]) -> None:
    """ConfigError when ``data.size`` does not suit the networks' downsampling or the discriminator."""
    model = config.model_as(LdmModelConfig)
    ae = model.autoencoder
    m = size_multiple(model)
    bad = [s for s in size if s % m]
    if bad:
        raise ConfigError(f"data.size {size}: each value must be divisible by {m} "
                          f"(the autoencoder's 2 ** (len(model.autoencoder.channels) - 1) times the UNet's "
                          f"2 ** (len(model.diffusion.channels) - 1))")
    if min(size) // 2**ae.disc_layers < 2:
        raise ConfigError(f"model.autoencoder.disc_layers={ae.disc_layers} is too deep for data.size {size} "
                          f"(each layer halves it; lower disc_layers or raise data.size)")


def load_autoencoder_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The autoencoder's weights and step from the run's newest valid autoencoder checkpoint."""
    from medsynth.training import checkpoint as ck

    folder = checkpoint_dir(Path(run_dir), "autoencoder")
    if not ck.checkpoint_paths(folder):
        raise CheckpointError(f"{run_dir}: no autoencoder checkpoint; train the autoencoder stage first "
                              "(medsynth train ... --stage autoencoder, or without --stage)")
    _, state = ck.load_latest_checkpoint(folder)
    try:
        return state["family_state"]["modules"]["autoencoder"], int(state["step"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{folder}: checkpoint holds no autoencoder weights") from None


# ---------------------------------------------------------------------------- the family


class _Reconstructor(torch.nn.Module):
    """``(image, eps) -> (reconstruction, mu, sigma)`` with explicit noise: the training forward of an
    AutoencoderKL (whose own forward draws global noise), in one call so DDP can wrap it."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.autoencoder.encode(image)
        return self.autoencoder.decode(mu + eps.to(mu.dtype) * sigma), mu, sigma


class LdmFamily(FamilyBase):
    """Latent diffusion: ``rt.stage`` is ``autoencoder`` or ``diffusion`` (see the module docstring)."""

    name = "ldm"
    stages = STAGES

    def __init__(self, config: Config, info: DataInfo, rt: Runtime) -> None:
        super().__init__(config, info, rt)
        if rt.stage not in STAGES:
            raise ConfigError(f"the ldm family trains in stages {', '.join(STAGES)}; got stage {rt.stage!r} "
                              "(use medsynth.training.ldm.train_ldm, which runs them in order)")
        self.stage = rt.stage
        m = config.model_as(LdmModelConfig)
        self.ae_cfg, self.df_cfg = m.autoencoder, m.diffusion
        check_sizes(config, list(info.size))
        self.factor = downsample_factor(self.ae_cfg)
        self.num_classes = info.num_classes if info.num_classes > 1 else 0
        self.fill_mode = m.fill
        self.flips = m.flips
        if m.fill != "none" and info.label_means is None:
            raise ConfigError(f"model.fill={m.fill!r} needs the training set's per-label means (DataInfo.label_means)")
        self.label_means = torch.tensor(info.label_means or [[0.0] * info.num_labels], dtype=torch.float32)
        dev = rt.device
        self.case_means: torch.Tensor | None = None  # (K, C, L) per training case, [0, 1] units
        if m.appearance == "per_case":
            if info.case_stats is None or info.label_means is None:
                raise ConfigError("model.appearance=per_case needs the training cases' label means")
            table = case_mean_table(info.case_stats.means, np.asarray(info.label_means))
            self.case_means = torch.as_tensor(table, dtype=torch.float32, device=dev)
        flash = use_flash(m, dev)
        self.autoencoder = build_autoencoder(self.ae_cfg, spatial_dims=info.dim, in_channels=info.num_channels,
                                             use_flash_attention=flash, zero_output=m.fill == "residual").to(dev)
        self.cache: LatentCache | None = None
        if self.stage == "autoencoder":
            self._init_autoencoder_stage(info)
        else:
            self._init_diffusion_stage(info, flash)

    # ------------------------------------------------------------------ construction
    def _init_autoencoder_stage(self, info: DataInfo) -> None:
        from medsynth.training.gan import PerceptualLoss

        self.discriminator = build_discriminator(self.ae_cfg, spatial_dims=info.dim,
                                                 in_channels=info.num_channels).to(self.rt.device)
        self.modules = {"autoencoder": self.autoencoder, "discriminator": self.discriminator}
        self.optimizers = {
            "autoencoder": self.make_optimizer(self.autoencoder.parameters(), self.ae_cfg.lr),
            "discriminator": self.make_optimizer(self.discriminator.parameters(), self.config.training.lr_d),
        }
        self.ae_train = self.rt.wrap(_Reconstructor(self.autoencoder))
        self.disc_train = self.rt.wrap(self.discriminator)
        p = self.ae_cfg.perceptual
        self.perceptual = None
        if p.weight > 0 and p.weights_path is not None:
            if not Path(p.weights_path).is_file():
                raise ConfigError(f"model.autoencoder.perceptual.weights_path: {p.weights_path}: file not found "
                                  "(the perceptual loss needs a local weights file; nothing is downloaded)")
            self.perceptual = PerceptualLoss(info.dim, p.network, p.weights_path).to(self.rt.device)

    def _init_diffusion_stage(self, info: DataInfo, flash: bool) -> None:
        ae_state, self.ae_step = load_autoencoder_state(self.rt.run_dir)
        try:
            self.autoencoder.load_state_dict(ae_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.rt.run_dir}: the autoencoder checkpoint does not fit "
                                  f"model.autoencoder ({str(exc).splitlines()[0]})") from None
        self.ae_digest = state_digest(ae_state)
        self.autoencoder.eval().requires_grad_(False)
        self.unet = MaskConditionedUNet(
            self.df_cfg, spatial_dims=info.dim, latent_channels=self.ae_cfg.latent_channels,
            num_labels=info.num_labels, num_classes=self.num_classes, downsample_factor=self.factor,
            use_flash_attention=flash, label_means=info.label_means if self.fill_mode != "none" else None,
            fill_sigma=info.fill_sigma,
        ).to(self.rt.device)
        self.modules = {"unet": self.unet}
        self.optimizers = {"unet": self.make_optimizer(self.unet.parameters(), self.config.training.lr)}
        ema = self.make_ema(self.unet)
        if ema is not None:
            self.emas["unet"] = ema
        self.unet_train = self.rt.wrap(self.unet)
        self.latent_size = [s // self.factor for s in info.size]
        base = 1
        for s in self.latent_size:
            base *= s
        self.base_numel = base
        self.process = make_process(self.df_cfg, info.dim, base)
        self.scale_factor: float | None = None
        self.cache = self._open_cache()

    def _open_cache(self) -> LatentCache | None:
        """The stage-2 latent cache of ``model.diffusion.latent_cache`` (None when ``store: off``): one row
        per pool crop, keyed by the autoencoder's digest, the training data and the pool's settings."""
        lc = self.df_cfg.latent_cache
        if lc.store == "off":
            return None
        row = (2, self.ae_cfg.latent_channels, *self.latent_size)
        plan = plan_store(lc, self.info.num_cases * lc.crops_per_case, row)
        data = {k: v for k, v in self.config.data.model_dump(mode="json").items() if k != "manifest"}
        fp = cache_fingerprint(autoencoder=self.ae_digest, data=self.info.fingerprint, info=self.info.to_dict(),
                               data_config=data, seed=self.rt.seed, crops_per_case=lc.crops_per_case,
                               flips=self.flips, fill=self.fill_mode, row=row,
                               **({"appearance": "per_case"} if self.case_means is not None else {}))
        folder = self.rt.run_dir / CACHE_DIR / f"rank{self.rt.rank}"
        return LatentCache(plan, fingerprint=fp, folder=folder if plan.store == "disk" else None)

    # ------------------------------------------------------------------ stage 1
    def means_of(self, batch: Batch) -> torch.Tensor | None:
        """(N, C, L) the per-case fill means of the batch's cases (``model.appearance: per_case``; None:
        the pooled fill, also for a batch that names no cases)."""
        if self.case_means is None or "case_index" not in batch:
            return None
        return self.case_means[batch["case_index"].to(self.case_means.device)]

    def base(self, label: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
        """What the autoencoder's output is added to: the label-mean fill ``(N, C, *spatial)`` of the
        one-hot ``label`` with ``model.fill: residual`` (painted with ``means`` ``(N, C, L)`` when given:
        a per-case fill), else zeros."""
        if self.fill_mode != "residual":
            return label.new_zeros((label.shape[0], self.info.num_channels, *label.shape[2:]))
        return fill_image(label, self.label_means if means is None else means, self.info.fill_sigma)

    def _autoencoder_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        c, rt = self.ae_cfg, self.rt
        real = batch["image"]
        base = self.base(batch["label"], self.means_of(batch))
        adv_on = c.adv_weight > 0 and step >= c.adv_start
        # 1. autoencoder: reconstruction, SSIM, KL (+ perceptual, + adversarial)
        self.discriminator.requires_grad_(False)
        latent = (real.shape[0], c.latent_channels, *(s // self.factor for s in real.shape[2:]))
        eps = torch.randn(latent, generator=rt.generator(step, _AE_EPS)).to(rt.device)
        with rt.autocast():
            recon, mu, sigma = self.ae_train(real - base, eps)
        recon = recon.float() + base
        l1 = F.l1_loss(recon, real)
        ssim = ssim_loss(recon, real) if c.ssim_weight > 0 else recon.new_zeros(())
        kl = kl_loss(mu, sigma)
        loss = l1 + c.ssim_weight * ssim + c.kl_weight * kl
        logs = {"l1": l1.detach(), "ssim_loss": ssim.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            p = self.perceptual(recon * 2 - 1, real * 2 - 1)
            loss = loss + c.perceptual.weight * p
            logs["perceptual"] = p.detach()
        if adv_on:
            with rt.autocast():
                g_adv = lsgan_loss(self.discriminator(recon)[-1], real=True)
            loss = loss + c.adv_weight * g_adv
            logs["g_adv"] = g_adv.detach()
        self.clip_and_step("autoencoder", loss)
        self.discriminator.requires_grad_(True)
        # 2. patch discriminator (after the warm-up)
        if adv_on:
            with rt.autocast():
                out = self.disc_train(torch.cat([real, recon.detach()]))[-1]
            n = real.shape[0]
            d = 0.5 * (lsgan_loss(out[:n], real=True) + lsgan_loss(out[n:], real=False))
            self.clip_and_step("discriminator", c.adv_weight * d)
            logs["d"] = d.detach()
        logs["loss"] = loss.detach()
        return logs

    @torch.no_grad()
    def _reconstruct(self, image: torch.Tensor, label: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior-mean reconstruction ``(N, C, *spatial)`` of images with one-hot ``label`` and, for a
        per-case fill, their fill means ``(N, C, L)`` (eval, previews and the held-out check), float32."""
        base = self.base(label, means)
        return self.autoencoder.decode(self.autoencoder.encode(image - base)[0]).float() + base

    def heldout_reconstruction(self) -> dict[str, Any]:
        """PSNR / SSIM (data range 1) of the posterior-mean reconstruction of the held-out items of
        :func:`medsynth.training.yardstick.evaluation_items` (3D: a ``data.size`` patch around the
        foreground's middle; 2D: each slice padded to the size multiple); {} when there are none."""
        from medsynth.data.loader import one_hot, pad_to
        from medsynth.training.yardstick import evaluation_items, score_pairs

        items, held_out = evaluation_items(self.config, self.info)
        reals, recons = [], []
        m = self.factor
        for item in items:
            image, index = item.image, item.index
            if self.info.dim == 3:
                size = list(self.info.size)
                image, index = pad_to(image, size, 0.0), pad_to(index, size, 0)
                fg = np.argwhere(index != 0)
                mid = fg.mean(0).round().astype(int) if len(fg) else np.array(index.shape) // 2
                starts = [int(min(max(0, c - s // 2), n - s)) for c, s, n in zip(mid, size, index.shape)]
                sl = tuple(slice(a, a + s) for a, s in zip(starts, size))
                image, index = image[(slice(None),) + sl], index[sl]
            else:
                image = pad_to(image, [-(-n // m) * m for n in index.shape], 0.0)
                index = pad_to(index, list(image.shape[1:]), 0)
            x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None].to(self.rt.device)
            lab = one_hot(torch.from_numpy(np.ascontiguousarray(index, np.int64))[None], self.info.num_labels)
            own = None
            if self.case_means is not None:  # a per-case fill: the item's own label means (pooled where absent)
                own = fill_means_of(x, lab.to(self.rt.device), self.label_means.to(self.rt.device))
            recon = self._reconstruct(x, lab.to(self.rt.device), own).clamp(0, 1)[0].cpu().numpy()
            reals.append(image)
            recons.append(recon)
        if not items:
            return {}
        ssim_v, psnr_v = score_pairs(reals, recons)
        return {"heldout_recon_psnr": round(psnr_v, 3), "heldout_recon_ssim": round(ssim_v, 5),
                "heldout_items": len(items), "held_out": held_out}

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def latents(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator,
                means: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled latents ``(N, Cz, *size/f)`` of images in [0, 1] with one-hot ``label`` (the
        autoencoder codes ``image - base(label, means)``), reparameterised with ``generator``."""
        with self.rt.autocast():
            z, _, _ = encode(self.autoencoder, image - self.base(label, means), generator=generator)
        return z.float()

    def _set_scale(self, z: torch.Tensor) -> float:
        """scale = 1 / std of ``z`` over every rank's batch (set and returned)."""
        stats = torch.stack([z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), device=z.device)]).double()
        if self.rt.distributed:
            import torch.distributed as dist

            dist.all_reduce(stats)
        mean = stats[0] / stats[2]
        var = stats[1] / stats[2] - mean * mean
        self.scale_factor = float(1.0 / var.clamp_min(1e-12).sqrt())
        return self.scale_factor

    def condition(self, batch: Batch) -> Condition:
        labels = batch.get("class_index") if self.num_classes > 0 else None
        return Condition(mask=batch["label"], class_labels=labels, label_means=self.means_of(batch))

    @torch.no_grad()
    def training_latents(self, batch: Batch, step: int) -> torch.Tensor:
        """Unscaled latents of a training batch with the noise of ``step``: :meth:`latents`, or with the
        cache, ``mu + sigma * eps`` from the cached posterior of each pool crop (``batch["index"]``),
        encoding (and storing) only the crops not cached yet. Both give the same latents."""
        generator = self.rt.generator(step, _ENCODE)
        means = self.means_of(batch)
        if self.cache is None:
            return self.latents(batch["image"], batch["label"], generator, means)
        keys = (batch["index"] - POOL_BASE).cpu()
        miss = self.cache.missing(keys)
        if bool(miss.any()):
            new = miss.to(batch["image"].device)
            with self.rt.autocast():
                mu, sigma = self.autoencoder.encode(batch["image"][new] - self.base(
                    batch["label"][new], None if means is None else means[new]))
            self.cache.put(keys[miss], torch.stack([mu.float(), sigma.float()], 1).cpu())
        rows = self.cache.get(keys).to(self.rt.device, non_blocking=True)
        mu, sigma = rows[:, 0], rows[:, 1]
        return mu + randn_like(mu, generator) * sigma

    def _pool_flips(self, batch: Batch) -> Batch:
        """``model.flips`` with the cache: each pool crop's flips drawn once, from its own stream (a cached
        row is the encoding of one flipped crop)."""
        keys = (batch["index"] - POOL_BASE).cpu().tolist()
        parts = [flip_batch({k: batch[k][i:i + 1] for k in ("image", "label", "label_index")},
                            torch.Generator().manual_seed(derive_seed(self.rt.seed, Stream.LATENT_POOL, int(p))))
                 for i, p in enumerate(keys)]
        return {**batch, **{k: torch.cat([part[k] for part in parts]) for k in ("image", "label", "label_index")}}

    def _diffusion_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        rt = self.rt
        # 1. scaled latents of the frozen autoencoder (cached per pool crop with model.diffusion.latent_cache)
        z = self.training_latents(batch, step)
        scale = self.scale_factor if self.scale_factor is not None else self._set_scale(z)
        z0 = z * scale
        n = z0.shape[0]
        # 2. condition dropout for classifier-free guidance
        cond = self.condition(batch)
        mask, labels = cond.mask, cond.class_labels
        if self.df_cfg.cond_dropout > 0:
            drop = torch.rand((n,), generator=rt.generator(step, _DROP)) < self.df_cfg.cond_dropout
            drop = drop.to(rt.device)
            null_mask, null_labels = self.unet.null_condition(mask, labels)
            mask = torch.where(drop.view(-1, *([1] * (mask.ndim - 1))), null_mask, mask)
            if labels is not None:
                labels = torch.where(drop, null_labels, labels)
        # 3. noise, timesteps, prediction, loss
        noise = torch.randn(z0.shape, generator=rt.generator(step, _NOISE)).to(rt.device)
        t = self.process.training_timesteps(n, tuple(z0.shape), rt.generator(step, _TIME), rt.device)
        loss = denoising_loss(self.unet_train, self.process, z0, noise, t, mask, labels, rt.autocast(),
                              cond.label_means)
        self.clip_and_step("unet", loss)
        ema = self.emas.get("unet")
        if ema is not None:
            ema.update_parameters(self.unet)
        return {"mse": loss.detach()}

    # ------------------------------------------------------------------ the contract
    def max_steps(self) -> int:
        return stage_steps(self.config, self.stage)

    def crop_pool(self) -> int | None:
        """Stage 2 with a latent cache: ``crops_per_case`` pool crops per case; else fresh crops."""
        if self.stage != "diffusion" or self.cache is None:
            return None
        return self.df_cfg.latent_cache.crops_per_case

    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if self.flips and self.stage == "diffusion" and self.cache is not None:
            batch = self._pool_flips(batch)
        elif self.flips:
            batch = flip_batch(batch, self.rt.generator(step, FLIP_STREAM))
        if self.stage == "autoencoder":
            return self._autoencoder_step(batch, step)
        return self._diffusion_step(batch, step)

    def _fixed_generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.rt.seed, Stream.LDM_EVAL, stream))

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        """Autoencoder: L1 and 1-SSIM of the posterior-mean reconstruction. Diffusion: the loss of the
        raw and EMA UNets on fixed noise at 8 evenly spread timesteps (once the scale is known, i.e.
        not before the first diffusion step)."""
        if self.stage == "autoencoder":
            recon = self._reconstruct(batch["image"], batch["label"], self.means_of(batch))
            return {"l1": float(F.l1_loss(recon, batch["image"])), "ssim_loss": float(ssim_loss(recon, batch["image"]))}
        if self.scale_factor is None:
            return {}
        # every item at EVAL_LEVELS stratified timesteps, fixed noise: a low-variance loss estimate
        k = EVAL_LEVELS
        image = batch["image"]
        z0 = self.latents(image, batch["label"], self._fixed_generator(0), self.means_of(batch)) * self.scale_factor
        z0 = z0.repeat(k, *[1] * (image.ndim - 1))
        n = image.shape[0]
        levels = (torch.arange(k, dtype=torch.float32) + 0.5) / k * self.process.T
        t = levels.repeat_interleave(n).to(z0.device)
        if self.process.kind == "ddpm":
            t = t.long()
        noise = torch.randn(z0.shape, generator=self._fixed_generator(1)).to(z0.device)
        z_t = self.process.add_noise(z0, noise, t)
        target = self.process.target(z0, noise, t)
        cond = self.condition(batch)
        mask = cond.mask.repeat(k, *[1] * (cond.mask.ndim - 1))
        labels = None if cond.class_labels is None else cond.class_labels.repeat(k)
        out = {}
        for name, net in (("mse", self.unet), ("mse_ema", self.emas["unet"].module if "unet" in self.emas else None)):
            if net is not None:
                out[name] = float(F.mse_loss(net(z_t, t, mask, labels).float(), target))
        return out

    def preview_multiple(self) -> int | None:
        """2D: previews show whole slices, padded to a multiple of the autoencoder's times the UNet's
        downsampling (sampled at their own size, as ``medsynth sample`` does). 3D: the fixed training
        crops (a slab through the whole volume is many crops' worth of sampling at every preview)."""
        if self.info.dim == 3:
            return None
        return size_multiple(self.config.model_as(LdmModelConfig))

    @torch.no_grad()
    def preview(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.stage == "autoencoder":
            return {"real": batch["image"],
                    "reconstruction": self._reconstruct(batch["image"], batch["label"],
                                                        self.means_of(batch)).clamp(0, 1)}
        if self.scale_factor is None:
            return {}
        net = self.inference_module("unet").eval()
        latent = [int(n) // self.factor for n in batch["image"].shape[2:]]
        z = sample_latents(net, self.condition(batch), (batch["image"].shape[0], self.ae_cfg.latent_channels, *latent),
                           process=self.process, sampler=self.df_cfg.sampler, steps=self.df_cfg.sample_steps,
                           generator=self._fixed_generator(3))
        self.unet.train()
        image = self.autoencoder.decode(z / self.scale_factor).float() + self.base(batch["label"], self.means_of(batch))
        return {"real": batch["image"], "generated": image.clamp(0, 1)}

    def extra_state(self) -> dict[str, Any]:
        if self.stage == "autoencoder":
            return {}
        return {"scale_factor": self.scale_factor, "autoencoder_digest": self.ae_digest,
                "autoencoder_step": self.ae_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.stage == "autoencoder":
            return
        if state.get("autoencoder_digest") != self.ae_digest:
            raise CheckpointError(f"{self.rt.run_dir}: the diffusion checkpoints were trained on another "
                                  "autoencoder; retrain the diffusion stage (medsynth.training.ldm.train_ldm "
                                  "does this on --resume)")
        sf = state.get("scale_factor")
        self.scale_factor = None if sf is None else float(sf)

    def export(self, run_dir: Path) -> dict[str, Any]:
        """After stage 1: the autoencoder facts. After stage 2: ``RUN/model.safetensors`` with
        ``autoencoder.*`` and (EMA) ``unet.*`` weights, and everything sampling needs."""
        facts: dict[str, Any] = {
            "network": "AutoencoderKL+DiffusionModelUNet",
            "downsample_factor": self.factor,
            "latent_channels": self.ae_cfg.latent_channels,
            "fill": self.fill_mode,
        }
        if self.case_means is not None and self.info.case_stats is not None and self.info.label_means is not None:
            dist = AppearanceDistribution.from_cases(self.info.case_stats.means, np.asarray(self.info.label_means))
            facts["appearance"] = {"fill": "per_case", **dist.describe()}
        else:
            facts["appearance"] = {"fill": "pooled"}
        if self.stage == "autoencoder":
            quality = self.heldout_reconstruction()
            if quality:
                with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"kind": "heldout", "step": self.max_steps(), "stage": "autoencoder",
                                         **quality}) + "\n")
                target = self.ae_cfg.target_psnr
                if quality["heldout_recon_psnr"] < target:
                    where = "held-out" if quality["held_out"] else "training (no labelled test cases)"
                    warnings.warn(f"{run_dir}: the autoencoder reconstructs {quality['heldout_items']} {where} "
                                  f"item(s) at PSNR {quality['heldout_recon_psnr']:.2f} dB, below "
                                  f"model.autoencoder.target_psnr {target:g}: diffusion samples cannot be "
                                  "sharper than that (train the autoencoder longer)", stacklevel=2)
            facts.update(quality)
            return facts
        if self.scale_factor is None:
            return facts  # no diffusion step was trained: nothing to sample with yet
        from medsynth.training.checkpoint import save_weights

        facts.update({
            "weights": WEIGHTS_FILE,
            "scale_factor": self.scale_factor,
            "conditioning": self.df_cfg.conditioning,
            "num_labels": self.info.num_labels,
            "num_classes": self.num_classes,
            "scheduler": self.df_cfg.scheduler,
            "prediction_type": self.process.prediction_type,
            "num_train_timesteps": self.df_cfg.num_train_timesteps,
            "base_numel": self.base_numel,
            "sampler": self.df_cfg.sampler,
            "sample_steps": self.df_cfg.sample_steps,
            "guidance": self.df_cfg.guidance,
            "cond_dropout": self.df_cfg.cond_dropout,
            "ema": "unet" in self.emas,
            "autoencoder_step": self.ae_step,
            "autoencoder_digest": self.ae_digest,
        })
        if self.cache is not None:
            facts["latent_cache"] = {"store": self.cache.plan.store, "crops": self.cache.plan.items,
                                     "encoded": self.cache.filled}
        tensors = {f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()}
        tensors.update({f"unet.{k}": v for k, v in self.inference_module("unet").state_dict().items()})
        save_weights(Path(run_dir) / WEIGHTS_FILE, tensors,
                     {"format": "medsynth-ldm", "scale_factor": self.scale_factor,
                      "conditioning": self.df_cfg.conditioning, "ema": "unet" in self.emas})
        return facts


# ---------------------------------------------------------------------------- the stages in order


def _diffusion_is_stale(run_dir: Path) -> bool:
    """True when the newest diffusion checkpoint was trained on other autoencoder weights than the
    newest autoencoder checkpoint's (or cannot say which)."""
    from medsynth.training import checkpoint as ck

    _, state = ck.load_latest_checkpoint(checkpoint_dir(run_dir, "diffusion"))
    try:
        recorded = state["family_state"]["extra"]["autoencoder_digest"]
    except (KeyError, TypeError):
        return True
    ae_state, _ = load_autoencoder_state(run_dir)
    return recorded != state_digest(ae_state)


def _clear_diffusion(run_dir: Path, rank: int) -> None:
    folder = checkpoint_dir(run_dir, "diffusion")
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        return
    deadline = time.monotonic() + 120
    while folder.exists() and time.monotonic() < deadline:  # rank 0 removes it
        time.sleep(0.1)


def check_autoencoder_gate(config: Config, run_dir: Path, *, force: bool, rank: int = 0) -> None:
    """Refuse to start the diffusion stage on an autoencoder whose measured reconstruction PSNR (the
    newest ``heldout`` record of the autoencoder stage) is below ``model.autoencoder.target_psnr``,
    unless ``force``. Rank 0 appends a ``gate`` record to ``metrics.jsonl`` and rewrites the report.
    JobError naming the measured value, the threshold and ``--force``. No measurement: passes."""
    found = [r for r in read_metrics(run_dir) if r["kind"] == "heldout" and r.get("stage") == "autoencoder"]
    if not found or not isinstance(found[-1].get("heldout_recon_psnr"), (int, float)):
        return
    psnr, target = float(found[-1]["heldout_recon_psnr"]), config.model_as(LdmModelConfig).autoencoder.target_psnr
    if psnr >= target:
        return
    if rank == 0:
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": "gate", "step": int(found[-1]["step"]), "stage": "autoencoder",
                                 "heldout_recon_psnr": psnr, "target_psnr": target, "forced": force}) + "\n")
        write_report(run_dir)
    if not force:
        raise JobError(f"{run_dir}: the autoencoder reconstructs at PSNR {psnr:.2f} dB, below "
                       f"model.autoencoder.target_psnr {target:g} dB: the diffusion stage was not started (train "
                       "the autoencoder longer, or pass --force to train the diffusion stage on it anyway)")


def train_ldm(config: Config, run_dir: str | Path, *, resume: bool = False, stage: str | None = None,
              progress: bool = True, allow_changed_data: bool = False, force: bool = False) -> TrainResult:
    """Train the latent diffusion stages into ``run_dir``: both in order, or only ``stage``.

    Each stage trains with :func:`stage_config` (its own batch size when set) for :func:`stage_steps`
    steps. ``resume`` continues each stage from its newest valid checkpoint; when the autoencoder is
    no longer the one the diffusion checkpoints were trained on, they are removed (with a warning)
    and the diffusion stage is trained again from its seed. The diffusion stage starts only on an
    autoencoder that passed the quality gate, or with ``force`` (:func:`check_autoencoder_gate`).
    Returns the engine's ``TrainResult`` of the last stage trained.
    """
    from medsynth.distributed import torchrun_env
    from medsynth.training import checkpoint as ck
    from medsynth.training.engine import check_run_dir, train

    run_dir = Path(run_dir)
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage: the ldm family has stages {', '.join(STAGES)}, got {stage!r}")
    check_run_dir(run_dir, stage, resume, "ldm")
    rank = torchrun_env().rank
    result: TrainResult | None = None
    for s in (STAGES if stage is None else (stage,)):
        has_ckpts = bool(ck.checkpoint_paths(checkpoint_dir(run_dir, s)))
        if s == "diffusion" and resume and has_ckpts and _diffusion_is_stale(run_dir):
            warnings.warn(f"{run_dir}: the autoencoder changed since the diffusion stage was trained; "
                          "training the diffusion stage again from its seed", stacklevel=2)
            _clear_diffusion(run_dir, rank)
            has_ckpts = False
        if s == "diffusion" and not has_ckpts:
            check_autoencoder_gate(config, run_dir, force=force, rank=rank)
        result = train(stage_config(config, s), run_dir, resume=resume and has_ckpts, stage=s, progress=progress,
                       allow_changed_data=allow_changed_data)
    assert result is not None  # STAGES is not empty
    return result
