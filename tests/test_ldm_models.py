"""Latent diffusion networks: autoencoder shapes, seeded encoding, tiled decoding, mask resampling,
and every conditioning scheme responding to the mask and the class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medsynth.config import LdmAutoencoderConfig, LdmDiffusionConfig
from medsynth.models.autoencoder import build_autoencoder, build_discriminator, decode, downsample_factor, encode
from medsynth.models.diffusion import MaskConditionedUNet, resample_mask


def _ae_cfg(**kw) -> LdmAutoencoderConfig:
    return LdmAutoencoderConfig(channels=[8, 8, 16], norm_num_groups=8, latent_channels=2, **kw)


@pytest.mark.parametrize("dims,spatial", [(2, (16, 24)), (3, (16, 16, 12))])
def test_autoencoder_shapes_and_seeded_encoding(dims, spatial):
    cfg = _ae_cfg()
    assert downsample_factor(cfg) == 4
    torch.manual_seed(0)
    ae = build_autoencoder(cfg, spatial_dims=dims, in_channels=1).eval()
    x = torch.rand(2, 1, *spatial)
    with torch.no_grad():
        z, mu, sigma = encode(ae, x, generator=torch.Generator().manual_seed(0))
        z2, _, _ = encode(ae, x, generator=torch.Generator().manual_seed(0))
        z3, _, _ = encode(ae, x, generator=torch.Generator().manual_seed(1))
        zm, _, _ = encode(ae, x, sample=False)
        y = decode(ae, z)
    assert z.shape == (2, 2, *(s // 4 for s in spatial))
    assert torch.equal(z, z2) and not torch.equal(z, z3)
    assert torch.equal(zm, mu) and torch.allclose(z, mu + (z - mu) / sigma * sigma)
    assert y.shape == x.shape
    disc = build_discriminator(_ae_cfg(disc_layers=2), spatial_dims=dims, in_channels=1)
    assert disc(x)[-1].shape[:2] == (2, 1)


class _Upsampler(nn.Module):
    """A decoder whose output at a voxel depends only on the latent voxel under it (x2, x-> 3x+1)."""

    def decode(self, z):
        for ax in range(2, z.ndim):
            z = z.repeat_interleave(2, dim=ax)
        return 3 * z + 1


def test_tiled_decoding_equals_whole_decoding_for_a_local_decoder():
    z = torch.randn(1, 2, 9, 7, 5, generator=torch.Generator().manual_seed(0))
    whole = decode(_Upsampler(), z)
    tiled = decode(_Upsampler(), z, tile=4, overlap=0.5, out_device="cpu")
    assert tiled.shape == (1, 2, 18, 14, 10) and type(tiled) is torch.Tensor
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_area_resampling_gives_label_fractions():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(8, 12))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(lab), 3).permute(2, 0, 1)[None].float()
    small = resample_mask(onehot, (2, 3), "area")
    # hand calculation: fraction of each label in each 4x4 block
    expected = np.stack([(lab == k).reshape(2, 4, 3, 4).mean(axis=(1, 3)) for k in range(3)])
    np.testing.assert_allclose(small[0].numpy(), expected, atol=1e-6)
    torch.testing.assert_close(small.sum(1), torch.ones(1, 2, 3))
    near = resample_mask(onehot, (2, 3), "nearest")
    assert set(near.unique().tolist()) <= {0.0, 1.0}
    # nearest picks the voxel nearest each coarse voxel's centre: block (i, j) of 4x4 reads
    # image voxel (4i + 2, 4j + 2) (plain "nearest" would read (4i, 4j), a 1.5-voxel shift)
    np.testing.assert_array_equal(near[0].argmax(0).numpy(), lab[2::4, 2::4])


def test_the_unet_reads_the_fill_and_the_pipeline_adds_it_in_float32(monkeypatch):
    """With label means the UNet's conditioning carries the label-mean fill (blurred by the fitted
    width); a residual pipeline decodes in float32 and adds that fill to the decoded residual."""
    from scipy.ndimage import gaussian_filter

    import medsynth.synthesis.ldm as L
    from medsynth.config import load_config
    from medsynth.diffusion import make_process, size_multiple

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/ldm2d.yaml").model
    means = [[0.1, 0.5, 0.9]]
    unet = MaskConditionedUNet(cfg.diffusion, spatial_dims=2, latent_channels=cfg.autoencoder.latent_channels,
                               num_labels=3, downsample_factor=downsample_factor(cfg.autoencoder),
                               label_means=means, fill_sigma=0.75)
    index = torch.zeros(1, 32, 32, dtype=torch.long)
    index[0, 8:20, 6:26] = 1
    index[0, 12:16, 10:14] = 2
    mask = nn.functional.one_hot(index, 3).permute(0, 3, 1, 2).float()
    expected = gaussian_filter(np.array(means[0])[index[0].numpy()], 0.75, mode="nearest")
    np.testing.assert_allclose(unet.fill_of(mask)[0, 0].numpy(), expected, atol=1e-6)
    ae = build_autoencoder(cfg.autoencoder, spatial_dims=2, in_channels=1)
    pipe = L.LatentDiffusionPipeline(ae, unet, make_process(cfg.diffusion, 2, 64), scale_factor=1.0,
                                     factor=downsample_factor(cfg.autoencoder), multiple=size_multiple(cfg),
                                     latent_channels=cfg.autoencoder.latent_channels,
                                     defaults=L.SamplingDefaults("rflow", 2, 1.0), residual=True)
    monkeypatch.setattr(L, "sample_latents", lambda net, cond, shape, **kw: torch.zeros(shape))
    with torch.no_grad():
        decoded = ae.decode(torch.zeros(1, cfg.autoencoder.latent_channels, 8, 8))
    out = pipe(mask, seed=0)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0].numpy(), np.clip(decoded[0, 0].numpy() + expected, 0, 1), atol=1e-5)


@pytest.mark.parametrize("conditioning", ["concat", "spade", "controlnet"])
def test_every_conditioning_reads_mask_and_class(conditioning):
    cfg = LdmDiffusionConfig(channels=[8, 16], norm_num_groups=8, num_head_channels=8, conditioning=conditioning,
                             spade_channels=8, controlnet_channels=8)
    torch.manual_seed(0)
    net = MaskConditionedUNet(cfg, spatial_dims=3, latent_channels=2, num_labels=3, num_classes=2,
                              downsample_factor=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # MONAI zero-initialises output layers; give every weight a value
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.eval()
    z = torch.randn(1, 2, 4, 4, 4, generator=g)
    t = torch.tensor([500.0])
    lab = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    lab[:, 4:12, 4:12, 4:12] = 1
    mask = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()
    other = torch.nn.functional.one_hot(torch.where(lab == 1, 2, lab), 3).movedim(-1, 1).float()
    with torch.no_grad():
        out = net(z, t, mask, torch.tensor([0]))
        assert out.shape == z.shape
        assert (out - net(z, t, other, torch.tensor([0]))).abs().max() > 1e-4
        assert (out - net(z, t, mask, torch.tensor([1]))).abs().max() > 1e-4
        null_mask, null_cls = net.null_condition(mask, torch.tensor([0]))
        assert null_cls.tolist() == [2] and not null_mask.any()
        torch.testing.assert_close(net(z, t, mask, None), net(z, t, mask, torch.tensor([2])))


def test_pipeline_padding_keeps_the_masks_background(monkeypatch):
    """A mask whose sides are no multiple of the network's is padded with background; the real
    background voxels keep their one-hot (an all-zero one-hot is the dropped-condition token)."""
    import medsynth.synthesis.ldm as L
    from medsynth.config import load_config
    from medsynth.diffusion import make_process, size_multiple

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/ldm2d.yaml").model
    ae = build_autoencoder(cfg.autoencoder, spatial_dims=2, in_channels=1)
    unet = MaskConditionedUNet(cfg.diffusion, spatial_dims=2, latent_channels=cfg.autoencoder.latent_channels,
                               num_labels=3, downsample_factor=downsample_factor(cfg.autoencoder))
    pipe = L.LatentDiffusionPipeline(ae, unet, make_process(cfg.diffusion, 2, 64), scale_factor=1.0,
                                     factor=downsample_factor(cfg.autoencoder), multiple=size_multiple(cfg),
                                     latent_channels=cfg.autoencoder.latent_channels,
                                     defaults=L.SamplingDefaults("rflow", 2, 1.0))
    seen = {}

    def fake_sampler(net, cond, shape, **kw):
        seen["mask"] = cond.mask.clone()
        return torch.zeros(shape)

    monkeypatch.setattr(L, "sample_latents", fake_sampler)
    index = torch.zeros(1, 30, 30, dtype=torch.long)
    index[0, 10:20, 10:20] = 1
    mask = nn.functional.one_hot(index, 3).permute(0, 3, 1, 2).float()
    out = pipe(mask, seed=0)
    padded = seen["mask"]
    assert padded.shape[2] % pipe.multiple == 0 and padded.shape[2] > 30
    torch.testing.assert_close(padded[:, :, :30, :30], mask)  # the original region is untouched
    assert torch.all(padded[0, 0, 30:, :] == 1) and torch.all(padded[0, 1:, 30:, :] == 0)
    assert tuple(out.shape[2:]) == (30, 30)


def test_a_fresh_residual_autoencoder_decodes_to_zero():
    """zero_output: the residual over the fill starts at zero, so a fresh residual run paints the fill."""
    from medsynth.config import LdmAutoencoderConfig

    cfg = LdmAutoencoderConfig(channels=[8, 16], norm_num_groups=8, latent_channels=2)
    ae = build_autoencoder(cfg, spatial_dims=2, in_channels=1, zero_output=True)
    with torch.no_grad():
        out = ae.decode(torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 1, 16, 16) and not out.abs().any()
    plain = build_autoencoder(cfg, spatial_dims=2, in_channels=1)
    with torch.no_grad():
        assert plain.decode(torch.randn(2, 2, 8, 8)).abs().max() > 0
