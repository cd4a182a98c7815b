"""Samplers: updates equal MONAI's where MONAI's are valid, an exact denoiser recovers a known
distribution, every sampler is shaped right and seed-deterministic."""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion import Condition, NoiseProcess, sample_latents
from medsynth.errors import ConfigError

MONAI_BETAS = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_updates_equal_monai_for_consecutive_steps(prediction_type):
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, generator=g)
    pred = torch.randn(2, 3, 8, 8, generator=g)
    proc = NoiseProcess("ddpm", prediction_type=prediction_type, spatial_dims=2)
    # DDPM: one step 500 -> 499 with the same noise draw
    ref = DDPMScheduler(1000, prediction_type=prediction_type, **MONAI_BETAS)
    ours = proc.step("ddpm", pred, z, 500, 499, torch.Generator().manual_seed(7))
    theirs, _ = ref.step(pred, 500, z, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    # DDIM: MONAI steps t -> t - T // steps
    ddim = DDIMScheduler(1000, prediction_type=prediction_type, **MONAI_BETAS)
    ddim.set_timesteps(10)
    theirs, _ = ddim.step(pred, 700, z)
    torch.testing.assert_close(proc.step("ddim", pred, z, 700, 600, None), theirs, atol=2e-6, rtol=1e-5)
    # rectified flow Euler step with an integer next timestep
    rf = RFlowScheduler(1000, use_discrete_timesteps=False)
    rf.set_timesteps(10)
    theirs, _ = rf.step(pred, 700.0, z, 600)
    torch.testing.assert_close(NoiseProcess("rflow").step("rflow", pred, z, 700.0, 600.0, None), theirs)


def _gaussian_oracle(process: NoiseProcess, mu: float, sd: float):
    """The exact denoiser for data z0 ~ N(mu, sd^2): E[z0 | z_t] in closed form."""

    def net(z, t, mask, class_labels):
        a, s = process.alpha_sigma(float(t[0]))
        x0 = mu + a * sd**2 / (a * a * sd**2 + s * s) * (z - a * mu)
        eps = (z - a * x0) / s
        if process.kind == "rflow":
            return x0 - eps
        return eps if process.prediction_type == "epsilon" else a * eps - s * x0

    return net


@pytest.mark.parametrize(
    "kind,prediction_type,sampler,steps",
    [("ddpm", "epsilon", "ddpm", 300), ("ddpm", "v_prediction", "ddim", 200),
     ("rflow", "epsilon", "rflow", 100), ("rflow", "epsilon", "ddpm", 200)],
)
def test_exact_denoiser_recovers_the_data_distribution(kind, prediction_type, sampler, steps):
    # Independent check of the whole chain: N(0.7, 0.5^2) data, analytic denoiser, 8000 draws.
    mu, sd, n = 0.7, 0.5, 8000
    proc = NoiseProcess(kind, prediction_type=prediction_type, spatial_dims=2)
    cond = Condition(mask=torch.zeros(n, 1, 1, 1))
    z = sample_latents(_gaussian_oracle(proc, mu, sd), cond, (n, 1, 1, 1), process=proc, sampler=sampler,
                       steps=steps, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.mean()) - mu) < 0.03
    assert abs(float(z.std()) - sd) < 0.03


def _tiny_net(spatial_dims: int, conditioning: str, num_classes: int = 0):
    from medsynth.config import LdmDiffusionConfig
    from medsynth.models.diffusion import MaskConditionedUNet

    cfg = LdmDiffusionConfig(channels=[8, 8], norm_num_groups=8, conditioning=conditioning,
                             spade_channels=8, controlnet_channels=8)
    torch.manual_seed(0)  # network init only; every sampling draw uses an explicit generator
    net = MaskConditionedUNet(cfg, spatial_dims=spatial_dims, latent_channels=2, num_labels=3,
                              num_classes=num_classes, downsample_factor=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # MONAI zero-initialises output convs; give every weight a value
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _mask(n: int, spatial: tuple[int, ...]) -> torch.Tensor:
    lab = torch.zeros((n, *spatial), dtype=torch.long)
    lab[:, 2:6, 2:6] = 1
    lab[:, 5:, 5:] = 2
    return torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()


@pytest.mark.parametrize("kind,sampler", [("rflow", "rflow"), ("rflow", "ddim"), ("rflow", "ddpm"),
                                          ("ddpm", "ddpm"), ("ddpm", "ddim")])
def test_every_sampler_shapes_and_seeds_2d(kind, sampler):
    net = _tiny_net(2, "concat")
    proc = NoiseProcess(kind, spatial_dims=2)
    cond = Condition(mask=_mask(2, (8, 8)))

    def run(seed):
        return sample_latents(net, cond, (2, 2, 4, 4), process=proc, sampler=sampler, steps=3,
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 2, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("conditioning", ["concat", "spade", "controlnet"])
def test_sampling_3d_with_guidance(conditioning):
    net = _tiny_net(3, conditioning, num_classes=2)
    proc = NoiseProcess("rflow", spatial_dims=3)
    mask = _mask(1, (8, 8, 8))
    cond = Condition(mask=mask, class_labels=torch.tensor([1]))
    null = Condition(mask=torch.zeros_like(mask), class_labels=torch.tensor([2]))

    def run(seed, guidance):
        return sample_latents(net, cond, (1, 2, 4, 4, 4), process=proc, sampler="rflow", steps=2,
                              guidance=guidance, null=null, generator=torch.Generator().manual_seed(seed))

    a = run(3, 2.0)
    assert a.shape == (1, 2, 4, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, run(3, 2.0))
    assert (a - run(3, 1.0)).abs().max() > 1e-4  # guidance changes the sample
    assert (a - run(4, 2.0)).abs().max() > 1e-3


def test_rflow_sampler_needs_a_rectified_flow_model():
    proc = NoiseProcess("ddpm", spatial_dims=2)
    with pytest.raises(ConfigError, match="rflow"):
        proc.timesteps("rflow", 4, (1, 2, 4, 4))
    with pytest.raises(ConfigError, match="steps"):
        proc.timesteps("ddim", 0, (1, 2, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("conditioning", ["concat", "controlnet"])
def test_cuda_graph_sampling_equals_eager(conditioning):
    net = _tiny_net(3, conditioning, num_classes=2).cuda()
    proc = NoiseProcess("rflow", spatial_dims=3)
    mask = _mask(2, (8, 8, 8)).cuda()
    cond = Condition(mask=mask, class_labels=torch.tensor([0, 1], device="cuda"))
    null = Condition(mask=torch.zeros_like(mask), class_labels=torch.tensor([2, 2], device="cuda"))

    def run(graph):
        return sample_latents(net, cond, (2, 2, 4, 4, 4), process=proc, sampler="ddpm", steps=5, guidance=1.5,
                              null=null, generator=torch.Generator().manual_seed(0), cuda_graph=graph)

    torch.testing.assert_close(run(True), run(False), atol=1e-4, rtol=1e-4)
