"""The ``maisi_controlnet`` family: a downloaded MAISI CT bundle's ControlNet fine-tuned on the dataset's pairs.

MAISI's own ControlNet training (``scripts/train_controlnet.py`` of Project-MONAI/tutorials
``generation/maisi``), on MONAI 1.6's classes and medsynth's engine (resume, checkpoints, run card, report):

- the bundle's autoencoder and diffusion UNet are loaded strictly and frozen (no gradient, never saved in a
  checkpoint; their files' sha256 are recorded and checked again on resume and at sampling);
- the ControlNet starts from the bundle's weights and is the only trained network: the UNet takes its
  residuals (``down_block_additional_residuals``, ``mid_block_additional_residual``);
- images are CT in HU mapped to [0, 1] over [-1000, 1000] with clipping (MAISI's ``ScaleIntensityRanged``:
  the recipe's ``data.ct_window`` must be exactly that), encoded to latents (``z = mu + sigma * eps``)
  and multiplied by the bundle's ``scale_factor``;
- labels go through the run's label mapping (:mod:`medsynth.bundles.labels`, spare slots for new
  classes), the body label 200 from the outline, and MAISI's 8-bit binary channels;
- each crop is turned into RAS axis order (the nearest orientation of its case's affine), the order the
  bundle was trained and samples in, and the UNet gets its RAS spacing x 100 (and the modality class, or
  the ddpm layout's body-region indices);
- the objective is MAISI's L1: rflow predicts ``z - noise`` at logit-normal timesteps (the bundle
  scheduler's ``sample_timesteps``), ddpm predicts the noise (or the sample / velocity its
  ``prediction_type`` names) at uniform integer timesteps; ``weighted_loss`` on ``weighted_labels``;
- the learning rate decays as MAISI's ``PolynomialLR(power=2)`` over ``training.max_steps`` (a resume
  with a larger ``max_steps`` continues on the schedule of the new count).

Export: ``RUN/model.safetensors`` holds the ControlNet (EMA weights when ``training.ema`` is set); the run
card's ``model`` holds the bundle folder, its layout, version and weights' sha256, the label mapping and the
sampling limits. ``medsynth sample RUN`` / ``Synthesizer.from_run`` then sample with the bundle's UNet and
autoencoder and the fine-tuned ControlNet (:mod:`medsynth.synthesis.maisi`). The bundle folder is only read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler

from medsynth.bundles.finetune_config import MaisiControlNetConfig
from medsynth.bundles.labels import add_body, read_mapping
from medsynth.bundles.networks import build, load_networks
from medsynth.bundles.reader import FROZEN_KEYS, read_bundle
from medsynth.bundles.sampler import HU_RANGE, binarize_labels, downsample_factor, unet_conditions
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.runcard import WEIGHTS_FILE
from medsynth.training.engine import Batch, FamilyBase, Runtime

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import Config
    from medsynth.data.loader import DataInfo

__all__ = ["FROZEN_KEYS", "CaseGeometry", "MaisiControlNetFamily"]

#: rt.generator streams of one step
_NOISE, _TIMESTEPS, _LATENT = 1, 2, 3
#: the evaluation's fixed draws and timestep (a share of the schedule)
_EVAL_SEED, _EVAL_T = 12345, 0.5


@dataclass(frozen=True)
class CaseGeometry:
    """One training case's axes: ``order[b]`` the voxel axis along RAS axis b, ``flip[b]`` whether it runs
    against it, ``spacing`` the RAS spacing in mm (after ``data.spacing`` resampling)."""

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]

    def to_ras(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        """``t`` of shape ``(*lead dims, X, Y, Z)`` in voxel order -> RAS order."""
        t = t.permute(*range(lead), *(lead + a for a in self.order))
        dims = [lead + b for b in range(3) if self.flip[b]]
        return t.flip(dims) if dims else t


def _case_geometries(config: Config, info: DataInfo) -> list[CaseGeometry]:
    """The axes of every training case, in the order of the engine's training data (the manifest's)."""
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume

    manifest = read_manifest(config.data.manifest) if config.data.manifest is not None else None
    cases = manifest.training_cases() if manifest is not None else []
    if len(cases) != info.num_cases:
        raise DataError(f"{config.data.manifest}: {len(cases)} training cases where the data held {info.num_cases}")
    out = []
    for case in cases:
        assert case.label is not None  # the engine's data has a label for every training case
        vol = read_volume(case.label, kind="label", root=manifest.root if manifest is not None else None)
        affine = np.asarray(vol.affine, np.float64)
        voxel_spacing = (config.data.spacing if config.data.spacing is not None
                         else np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        order, flip = [0, 0, 0], [False, False, False]
        for a, (b, sign) in enumerate(nib.orientations.io_orientation(affine)):
            order[int(b)], flip[int(b)] = a, bool(sign < 0)
        out.append(CaseGeometry((order[0], order[1], order[2]), (flip[0], flip[1], flip[2]),
                                tuple(float(voxel_spacing[order[b]]) for b in range(3))))  # type: ignore[arg-type]
    return out


class MaisiControlNetFamily(FamilyBase):
    """The ControlNet of ``model.bundle`` trained on the dataset (see the module docstring)."""

    name = "maisi_controlnet"

    def __init__(self, config: Config, info: DataInfo, rt: Runtime) -> None:
        super().__init__(config, info, rt)
        section = config.model_as(MaisiControlNetConfig)
        # 1. the bundle, the mapping and the data's fit to them
        if section.bundle is None or section.labels is None:
            missing = "model.bundle" if section.bundle is None else "model.labels"
            raise ConfigError(f"{missing}: required for maisi_controlnet (e.g. --set model.bundle=BUNDLE_DIR "
                              "--set model.labels=MAPPING.yaml; docs/maisi.md)")
        self.section = section
        self.bundle = read_bundle(section.bundle)
        self.mapping = read_mapping(section.labels, self.bundle)
        self._check_data(config, info)
        self.limits = section.limits.limits()
        self.limits.check(downsample_factor(self.bundle))
        self.geometries = _case_geometries(config, info)
        self._check_geometries(config)
        self.checksums = self.bundle.checksums(FROZEN_KEYS)
        # 2. the networks: autoencoder and UNet frozen, the ControlNet trained from the bundle's weights
        nets = load_networks(self.bundle, rt.device)
        self.autoencoder, self.unet, self.scale_factor = nets.autoencoder, nets.unet, nets.scale_factor
        for frozen in (self.autoencoder, self.unet):
            frozen.requires_grad_(False).eval()
        self.controlnet = nets.controlnet.train().requires_grad_(True)
        self.modules["controlnet"] = self.controlnet
        self.train_controlnet = rt.wrap(self.controlnet)
        opt = self.make_optimizer(self.controlnet.parameters(), config.training.lr)
        self.optimizers["controlnet"] = opt
        total = max(1, config.training.max_steps)  # MAISI's PolynomialLR(power=2), over this call's max_steps
        self.schedulers["controlnet"] = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: (1.0 - min(k, total) / total) ** 2)
        ema = self.make_ema(self.controlnet)
        if ema is not None:
            self.emas["controlnet"] = ema
        self.scheduler = build(self.bundle.scheduler, torch.device("cpu"))
        # 3. label channel index -> bundle value; the weighted labels' channel indices
        self.lut = np.array([self.mapping.values[v] for v in info.labels], np.uint8)
        self.weighted = [info.labels.index(v) for v in section.weighted_labels]

    # ------------------------------------------------------------------ checks
    def _check_data(self, config: Config, info: DataInfo) -> None:
        if info.dim != 3 or info.volume_ndim != 3:
            raise ConfigError("data.dim: maisi_controlnet trains on 3D volumes (data.dim: 3)")
        if info.num_channels != 1:
            raise ConfigError(f"{config.data.manifest}: {info.num_channels} image channels; a MAISI CT bundle "
                              "makes one (CT)")
        norm = info.normalization
        if norm.mode != "ct_window" or (norm.lo[0], norm.hi[0]) != HU_RANGE:
            raise ConfigError(f"data.ct_window: maisi_controlnet needs [{HU_RANGE[0]:g}, {HU_RANGE[1]:g}] (the HU "
                              "range MAISI's autoencoder was trained on), and images in HU")
        unmapped = [v for v in info.labels if v not in self.mapping.values]
        if unmapped:
            raise ConfigError(f"{self.mapping.source}: dataset label value(s) {unmapped} are not mapped; map each "
                              "to a bundle label name (or 'spare')")
        unknown = [v for v in self.section.weighted_labels if v not in info.labels]
        if unknown:
            raise ConfigError(f"model.weighted_labels: {unknown} are not label values of the dataset {info.labels}")
        factor = downsample_factor(self.bundle)
        bad = [s for s in config.data.size if s % factor]
        if bad:
            raise ConfigError(f"data.size: {config.data.size}: each side must be a multiple of {factor} (the "
                              "bundle's autoencoder x UNet downsampling)")

    def _check_geometries(self, config: Config) -> None:
        size = config.data.size
        shapes = {tuple(size[g.order[b]] for b in range(3)) for g in self.geometries}
        if len(shapes) > 1:
            raise ConfigError(f"data.size {size}: the training cases store their axes in different orders, so "
                              f"their crops turn into RAS crops of shapes {sorted(shapes)}; use equal sides")
        lim = self.limits
        for i, g in enumerate(self.geometries):
            xy, z = g.spacing[:2], g.spacing[2]
            if not (all(lim.xy_spacing[0] - 1e-6 <= s <= lim.xy_spacing[1] + 1e-6 for s in xy)
                    and lim.z_spacing[0] - 1e-6 <= z <= lim.z_spacing[1] + 1e-6):
                raise ConfigError(f"training case {i + 1}: RAS spacing {[round(s, 3) for s in g.spacing]} mm is "
                                  f"outside the bundle's in-plane {list(lim.xy_spacing)} / axial "
                                  f"{list(lim.z_spacing)} mm; set data.spacing to resample every case")

    def _check_bundle_unchanged(self, recorded: Mapping[str, str]) -> None:
        for key, digest in recorded.items():
            if self.checksums.get(key) != digest:
                raise CheckpointError(f"{self.bundle.weights[key]}: changed since the run started (sha256 "
                                      f"{self.checksums.get(key)}, the run recorded {digest}); resume with the "
                                      "bundle the run was trained on")

    # ------------------------------------------------------------------ one step
    def _inputs(self, batch: Batch, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(latents x scale_factor, ControlNet input, UNet conditions, label indices on the latent grid)."""
        dev = self.rt.device
        images, labels, spacings = [], [], []
        for i, c in enumerate(batch["case_index"].tolist()):
            g = self.geometries[int(c)]
            images.append(g.to_ras(batch["image"][i], 1))
            labels.append(g.to_ras(batch["label_index"][i], 0))
            spacings.append(g.spacing)
        image = torch.stack(images).to(dev)
        index = torch.stack(labels)
        mapped = self.lut[index.cpu().numpy()]
        if self.mapping.body == "outline":
            mapped = np.stack([add_body(m, z_axis=2) for m in mapped])
        cond = binarize_labels(torch.from_numpy(mapped.astype(np.int64))[:, None].to(dev))
        with torch.no_grad():
            mu, sigma = self.autoencoder.encode(image)
            eps = torch.randn(mu.shape, generator=generator).to(dev) if generator is not None else 0.0
            latents = (mu + sigma * eps) * self.scale_factor
        small = F.interpolate(index[:, None].float(), size=latents.shape[2:], mode="nearest")[:, 0].long().to(dev)
        return latents, cond, unet_conditions(self.bundle, spacings, dev), small

    def _timesteps(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = latents.shape[0]
        if isinstance(self.scheduler, RFlowScheduler):
            # MONAI draws from the global RNG: seeded from this step's generator, the caller's RNG kept
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                return self.scheduler.sample_timesteps(torch.empty(latents.shape)).float()
        return torch.randint(0, self.scheduler.num_train_timesteps, (n,), generator=generator).long()

    def _loss(self, latents: torch.Tensor, cond: torch.Tensor, extra: dict[str, torch.Tensor],
              index: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, controlnet: torch.nn.Module) -> torch.Tensor:
        dev = self.rt.device
        t = t.to(dev)
        noisy = self.scheduler.add_noise(original_samples=latents, noise=noise, timesteps=t)
        control = {"class_labels": extra["class_labels"]} if "class_labels" in extra else {}
        with self.rt.autocast():
            down, mid = controlnet(x=noisy, timesteps=t, controlnet_cond=cond, **control)
            pred = self.unet(x=noisy, timesteps=t, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, **extra)
        if isinstance(self.scheduler, RFlowScheduler):
            target = latents - noise
        elif self.scheduler.prediction_type == "epsilon":
            target = noise
        elif self.scheduler.prediction_type == "sample":
            target = latents
        else:
            target = self.scheduler.get_velocity(latents, noise, t)
        err = (pred.float() - target.float()).abs()
        if self.weighted and self.section.weighted_loss > 1.0:
            roi = torch.isin(index, torch.tensor(self.weighted, device=dev))[:, None]
            err = err * torch.where(roi, self.section.weighted_loss, 1.0)
        return err.mean()

    def train_step(self, batch: Batch, step: int) -> Mapping[str, torch.Tensor | float]:
        # 1. RAS crops -> scaled latents, the ControlNet's label channels, the UNet's conditions
        latents, cond, extra, index = self._inputs(batch, self.rt.generator(step, _LATENT))
        # 2. noise and timesteps from this step's generators (a resumed run draws the same)
        noise = torch.randn(latents.shape, generator=self.rt.generator(step, _NOISE)).to(self.rt.device)
        t = self._timesteps(latents, self.rt.generator(step, _TIMESTEPS))
        # 3. MAISI's L1 through the frozen UNet; only the ControlNet steps
        self.controlnet.train()
        loss = self._loss(latents, cond, extra, index, noise, t, self.train_controlnet)
        self.clip_and_step("controlnet", loss)
        ema = self.emas.get("controlnet")
        if ema is not None:
            ema.update_parameters(self.controlnet)
        return {"l1": loss.detach()}

    def evaluate(self, batch: Batch) -> dict[str, float]:
        """The L1 of the inference ControlNet on the fixed batch at one fixed timestep and noise."""
        net = self.inference_module("controlnet")
        latents, cond, extra, index = self._inputs(batch, None)
        gen = torch.Generator().manual_seed(_EVAL_SEED)
        noise = torch.randn(latents.shape, generator=gen).to(self.rt.device)
        t_value = _EVAL_T * self.scheduler.num_train_timesteps
        t = torch.full((latents.shape[0],), t_value)
        t = t if isinstance(self.scheduler, RFlowScheduler) else t.long()
        net.eval()
        return {"l1_eval": float(self._loss(latents, cond, extra, index, noise, t, net))}

    def preview(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    # ------------------------------------------------------------------ state and export
    def extra_state(self) -> dict[str, Any]:
        values = {str(k): int(v) for k, v in self.mapping.values.items()}
        return {"bundle_sha256": dict(self.checksums), "label_values": values, "body": self.mapping.body}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._check_bundle_unchanged(state.get("bundle_sha256", {}))
        now = self.extra_state()
        if (state.get("label_values"), state.get("body")) != (now["label_values"], now["body"]):
            raise CheckpointError(f"{self.mapping.source}: maps the labels otherwise than when the run started "
                                  f"({state.get('label_values')}, body {state.get('body')}); resume with the same "
                                  "mapping")

    def export(self, run_dir: Path) -> dict[str, Any]:
        """RUN/model.safetensors: the fine-tuned ControlNet (EMA weights when kept); the facts sampling needs."""
        from medsynth.training.checkpoint import save_weights

        net = self.inference_module("controlnet")
        save_weights(Path(run_dir) / WEIGHTS_FILE, net.state_dict(),
                     {"format": "medsynth-maisi-controlnet", "ema": "controlnet" in self.emas})
        return {"weights": WEIGHTS_FILE, "network": "ControlNetMaisi", "ema": "controlnet" in self.emas,
                "bundle": str(self.bundle.root.resolve()), "bundle_layout": self.bundle.layout,
                "bundle_version": self.bundle.version, "bundle_sha256": dict(self.checksums),
                "label_mapping": self.mapping.to_facts(), "limits": self.section.limits.model_dump(mode="json"),
                "sample_steps": self.section.sample_steps}
