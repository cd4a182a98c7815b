"""The GAN family: one training step of a mask-conditioned SPADE GAN, its losses and its export.

Step (pix2pixHD / SPADE recipe), images mapped from [0, 1] to [-1, 1]:
  1. generator: fake = G(cond, noise) (a residual over the label-mean fill by default, see
     :mod:`medsynth.models.gan`; with ``appearance: per_case`` the fill of each sample's own training
     case's label means); loss = w_adv * adv(D(fake|cond)) + w_fm * feature matching (L1
     between D's intermediate maps of fake and real, summed over layers, mean over scales) + w_l1 *
     |fake - real| (+ w_p * perceptual) (+ the mode-seeking term: the first half of the batch again
     with a second noise draw, ``- w_div * min(mean|fake2 - fake| / mean|z2 - z|, clamp)``, Mao et al.
     2019); Adam step on G only (D frozen, not DDP-wrapped for this pass).
  2. EMA update of G.
  3. discriminator: D(real|cond) vs D(fake.detach()|cond) in one batch; hinge or least squares.
Noise for step s is drawn from ``rt.generator(s)``, so resumed runs draw the same noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth.config import GanModelConfig
from medsynth.errors import ConfigError
from medsynth.models.appearance import AppearanceDistribution, case_mean_table
from medsynth.models.gan import build_discriminator, build_generator, check_sizes, condition_map
from medsynth.runcard import WEIGHTS_FILE
from medsynth.safe_weights import read_safetensors
from medsynth.seeds import Stream, derive_seed
from medsynth.training.engine import FLIP_STREAM, Batch, FamilyBase, Runtime, flip_batch

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import Config
    from medsynth.data.loader import DataInfo


# ---------------------------------------------------------------------------- losses


def adversarial_d_loss(real_out: list[torch.Tensor], fake_out: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Discriminator loss over scales: hinge ``relu(1 - D(real)) + relu(1 + D(fake))`` or least
    squares ``((D(real) - 1)^2 + D(fake)^2) / 2``; mean over patches, mean over scales."""
    terms = []
    for r, f in zip(real_out, fake_out):
        r, f = r.float(), f.float()
        if kind == "hinge":
            terms.append(F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean())
        else:
            terms.append(0.5 * ((r - 1.0) ** 2).mean() + 0.5 * (f**2).mean())
    return torch.stack(terms).mean()


def adversarial_g_loss(fake_out: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Generator adversarial loss: hinge ``-D(fake)`` or least squares ``(D(fake) - 1)^2``."""
    terms = [(-f.float()).mean() if kind == "hinge" else ((f.float() - 1.0) ** 2).mean() for f in fake_out]
    return torch.stack(terms).mean()


def mode_seeking_ratio(fake_a: torch.Tensor, fake_b: torch.Tensor, noise_a: list[torch.Tensor],
                       noise_b: list[torch.Tensor]) -> torch.Tensor:
    """Mao et al. 2019: ``mean|fake_a - fake_b| / mean|noise_a - noise_b|`` (the noise tensors of one
    draw flattened together), the image change per unit of noise change."""
    dz = torch.cat([(a - b).abs().flatten() for a, b in zip(noise_a, noise_b)]).mean()
    return (fake_a.float() - fake_b.float()).abs().mean() / (dz + 1e-8)


def feature_matching_loss(fake_feats: list[list[torch.Tensor]], real_feats: list[list[torch.Tensor]]) -> torch.Tensor:
    """Feature matching as in SPADE / pix2pixHD: the L1 between D's intermediate maps of fake and
    (detached) real, summed over layers, averaged over scales."""
    per_scale: list[torch.Tensor] = []
    for ff, rf in zip(fake_feats, real_feats):
        per_scale.append(cast(torch.Tensor, sum(F.l1_loss(a.float(), b.detach().float()) for a, b in zip(ff, rf))))
    return torch.stack(per_scale).mean()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between frozen MONAI-ResNet features (layers 1-4) of two images.

    Weights come from a local file only (``.safetensors``, or a ``.pt`` state dict read with
    weights_only=True; a ``module.`` prefix and ``fc.*`` keys are ignored). Each channel of the image
    is fed separately (the network takes 1 channel). Inputs (N, C, *spatial) in [-1, 1].
    """

    def __init__(self, spatial_dims: int, network: str, weights_path: Path) -> None:
        super().__init__()
        from monai.networks.nets import resnet

        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise ConfigError(f"model.loss.perceptual.weights_path: {weights_path}: file not found "
                              "(the perceptual loss needs a local weights file; nothing is downloaded)")
        depth = int(network.replace("resnet", ""))
        bias_downsample, shortcut = resnet.get_medicalnet_pretrained_resnet_args(depth)
        self.net = getattr(resnet, network)(spatial_dims=spatial_dims, n_input_channels=1, feed_forward=False,
                                            shortcut_type=shortcut, bias_downsample=bias_downsample)
        state = _read_state_dict(weights_path)
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        want = set(self.net.state_dict())
        missing = sorted(want - set(state))
        if missing:
            raise ConfigError(f"model.loss.perceptual.weights_path: {weights_path} does not hold {network} "
                              f"weights ({len(missing)} missing, e.g. {missing[:3]})")
        try:
            self.net.load_state_dict({k: state[k] for k in want})
        except RuntimeError as exc:
            raise ConfigError(f"model.loss.perceptual.weights_path: {weights_path}: "
                              f"{str(exc).splitlines()[0]}") from None
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # always frozen, BN in eval mode
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        out = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        total = fake.new_zeros(())
        for c in range(fake.shape[1]):
            ff, rf = self._features(fake[:, c : c + 1]), self._features(real[:, c : c + 1])
            for a, b in zip(ff, rf):
                a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((a - b.detach()) ** 2).sum(dim=1).mean()
        return total / fake.shape[1]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.loss.perceptual.weights_path: {path}: cannot be read safely "
                          f"({type(exc).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"model.loss.perceptual.weights_path: {path}: not a state dict")
    return obj


# ---------------------------------------------------------------------------- the family


class GanFamily(FamilyBase):
    """Mask-conditioned SPADE GAN (see the module docstring)."""

    name = "gan"

    def __init__(self, config: Config, info: DataInfo, rt: Runtime) -> None:
        super().__init__(config, info, rt)
        model = config.model_as(GanModelConfig)
        check_sizes(model, info.size)
        self.loss_cfg = model.loss
        self.flips = model.flips
        dev = rt.device
        self.G = build_generator(model, info).to(dev)
        self.case_means: torch.Tensor | None = None  # (K, C, L) per training case, [0, 1] units
        if model.generator.appearance == "per_case":
            if info.case_stats is None or info.label_means is None:
                raise ConfigError("model.generator.appearance=per_case needs the training cases' label means")
            table = case_mean_table(info.case_stats.means, np.asarray(info.label_means))
            self.case_means = torch.as_tensor(table, dtype=torch.float32, device=dev)
        self.D = build_discriminator(model, info).to(dev)
        self.modules = {"generator": self.G, "discriminator": self.D}
        self.optimizers = {
            "generator": self.make_optimizer(self.G.parameters(), config.training.lr),
            "discriminator": self.make_optimizer(self.D.parameters(), config.training.lr_d),
        }
        ema = self.make_ema(self.G)
        if ema is not None:
            self.emas["generator"] = ema
        self.G_train = rt.wrap(self.G)
        self.D_train = rt.wrap(self.D)
        p = model.loss.perceptual
        self.perceptual = (PerceptualLoss(info.dim, p.network, p.weights_path).to(dev)
                           if p.weight > 0 and p.weights_path is not None else None)

    # -- helpers
    def cond(self, batch: Batch) -> torch.Tensor:
        return condition_map(batch["label"], batch.get("class_index"), self.info.num_classes)

    def noise(self, n: int, spatial: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
        """[coarse map, level maps...] on the device (:meth:`SpadeGenerator.draw_noise`)."""
        coarse, levels = self.G.draw_noise(n, spatial, gen)
        return [t.to(self.rt.device) for t in (coarse, *levels)]

    def means_of(self, batch: Batch) -> torch.Tensor | None:
        """(N, C, L) the per-case fill means of the batch's cases (None: the pooled fill, also for a
        batch that names no cases)."""
        if self.case_means is None or "case_index" not in batch:
            return None
        return self.case_means[batch["case_index"].to(self.case_means.device)]

    def generate(self, net: nn.Module, cond: torch.Tensor, z: list[torch.Tensor],
                 means: torch.Tensor | None) -> torch.Tensor:
        return cast(torch.Tensor, net(cond, z[0], z[1:] or None, means))

    # -- contract
    def train_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        lc, rt = self.loss_cfg, self.rt
        if self.flips:
            batch = flip_batch(batch, rt.generator(step, FLIP_STREAM))
        real = batch["image"] * 2.0 - 1.0
        cond = self.cond(batch)
        n = real.shape[0]
        gen = rt.generator(step)
        z = self.noise(n, tuple(real.shape[2:]), gen)
        means = self.means_of(batch)
        # mode seeking: the first h samples again with a second draw, in the same forward pass (one
        # graph: DDP sees one forward per backward)
        h = (n + 1) // 2 if lc.diversity_weight > 0 else 0
        z2 = self.noise(h, tuple(real.shape[2:]), gen) if h else []
        cond_g = torch.cat([cond, cond[:h]]) if h else cond
        z_g = [torch.cat([a, b]) for a, b in zip(z, z2)] if h else z
        means_g = None if means is None else (torch.cat([means, means[:h]]) if h else means)

        # 1. generator step (D frozen; the raw D, so no DDP sync for D here)
        self.D.requires_grad_(False)
        with rt.autocast():
            fake_all = self.generate(self.G_train, cond_g, z_g, means_g)
            fake = fake_all[:n]
            outs, feats = self.D(torch.cat([torch.cat([fake, cond], 1), torch.cat([real, cond], 1)], 0))
        fake_out = [o[:n] for o in outs]
        fake_feats = [[f[:n] for f in fs] for fs in feats]
        real_feats = [[f[n:] for f in fs] for fs in feats]
        fake = fake.float()
        g_adv = adversarial_g_loss(fake_out, lc.adversarial)
        g_fm = feature_matching_loss(fake_feats, real_feats)
        g_l1 = F.l1_loss(fake, real)
        loss_g = lc.adversarial_weight * g_adv + lc.feature_matching_weight * g_fm + lc.l1_weight * g_l1
        logs = {"g_adv": g_adv.detach(), "g_fm": g_fm.detach(), "g_l1": g_l1.detach()}
        if self.perceptual is not None:
            g_p = self.perceptual(fake, real)
            loss_g = loss_g + lc.perceptual.weight * g_p
            logs["g_perceptual"] = g_p.detach()
        if h:
            ratio = mode_seeking_ratio(fake_all[n:], fake[:h], z2, [t[:h] for t in z])
            loss_g = loss_g - lc.diversity_weight * torch.clamp(ratio, max=lc.diversity_clamp)
            logs["g_diversity"] = ratio.detach()
        self.clip_and_step("generator", loss_g)
        self.D.requires_grad_(True)

        # 2. EMA of the generator
        ema = self.emas.get("generator")
        if ema is not None:
            ema.update_parameters(self.G)

        # 3. discriminator step on real and detached fake in one batch
        with rt.autocast():
            outs, _ = self.D_train(torch.cat([torch.cat([real, cond], 1), torch.cat([fake.detach(), cond], 1)], 0))
        loss_d = adversarial_d_loss([o[:n] for o in outs], [o[n:] for o in outs], lc.adversarial)
        self.clip_and_step("discriminator", loss_d)
        logs["d"] = loss_d.detach()
        logs["g_total"] = loss_g.detach()
        return logs

    def _fixed_noise(self, batch: Batch) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(derive_seed(self.rt.seed, Stream.GAN_EVAL))
        return self.noise(batch["image"].shape[0], tuple(batch["image"].shape[2:]), gen)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        """L1 (in [0, 1] units) of the raw and EMA generators to the real images, fixed noise (and the
        cases' own fill means with a per-case fill)."""
        cond, z, means = self.cond(batch), self._fixed_noise(batch), self.means_of(batch)
        out = {"l1": float((self.generate(self.G, cond, z, means) * 0.5 + 0.5 - batch["image"]).abs().mean())}
        if "generator" in self.emas:
            ema = self.emas["generator"].module
            out["l1_ema"] = float((self.generate(ema, cond, z, means) * 0.5 + 0.5 - batch["image"]).abs().mean())
        return out

    def preview_multiple(self) -> int:
        """The generator is fully convolutional: previews show whole slices (3D: slabs), padded to
        a multiple of its downsampling factor."""
        return int(self.G.factor)

    @torch.no_grad()
    def preview(self, batch: Batch) -> dict[str, torch.Tensor]:
        g = self.inference_module("generator")
        fake = self.generate(g, self.cond(batch), self._fixed_noise(batch), self.means_of(batch)) * 0.5 + 0.5
        return {"real": batch["image"], "generated": fake}

    def export(self, run_dir: Path) -> dict[str, Any]:
        """RUN/model.safetensors: the generator's (EMA) weights."""
        from medsynth.training.checkpoint import save_weights

        g = self.inference_module("generator")
        save_weights(Path(run_dir) / WEIGHTS_FILE, g.state_dict(),
                     {"format": "medsynth-gan-generator", "ema": "generator" in self.emas})
        out: dict[str, Any] = {"weights": WEIGHTS_FILE, "network": "SpadeGenerator", "ema": "generator" in self.emas,
                               "size_multiple": self.G.factor, "noise_channels": self.G.noise_channels,
                               "fill": self.G.fill, "level_noise": self.G.noise_scales is not None}
        if self.case_means is not None and self.info.case_stats is not None and self.info.label_means is not None:
            dist = AppearanceDistribution.from_cases(self.info.case_stats.means, np.asarray(self.info.label_means))
            out["appearance"] = {"fill": "per_case", **dist.describe()}
        else:
            out["appearance"] = {"fill": "pooled"}
        return out
