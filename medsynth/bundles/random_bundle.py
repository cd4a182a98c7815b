"""A bundle folder with random weights, in the exact file names and key layout of the published ones.

Memory and time do not depend on the weights, so a random bundle of the published architecture measures
what the real one costs (``benchmarks/maisi_device.sh``), and a tiny one (MONAI's own test sizes:
autoencoder channels (4, 4, 4), UNet and ControlNet channels (8, 8, 8)) exercises every code path on a
CPU in seconds (``tests/test_maisi_bundle.py``). The file names, config keys and values are those of
Project-MONAI/model-zoo ``models/maisi_ct_generative/configs/inference.json`` (ddpm: bundle 0.4.x;
rflow: bundle 1.0.x), with the entries medsynth never reads left out.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch

from medsynth.bundles.networks import build
from medsynth.bundles.reader import ALLOWED_TARGETS, NetworkDef

__all__ = ["WEIGHT_FILES", "bundle_config", "write_random_bundle"]

#: layout -> (autoencoder, diffusion UNet, ControlNet) file names under models/
WEIGHT_FILES: dict[str, tuple[str, str, str]] = {
    "ddpm": ("autoencoder_epoch273.pt", "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
             "controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt"),
    "rflow": ("autoencoder_epoch273.pt", "diff_unet_ckpt_epoch19350.pt", "controlnet_current.pt"),
}
_VERSION = {"ddpm": "0.4.5", "rflow": "1.0.0"}
_AE = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi"
_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
_CN = "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi"

_PUBLISHED: dict[str, Any] = {
    "autoencoder_def": {"_target_": _AE, "spatial_dims": "@spatial_dims", "in_channels": "@image_channels",
                        "out_channels": "@image_channels", "latent_channels": "@latent_channels",
                        "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32,
                        "norm_eps": 1e-06, "attention_levels": [False, False, False],
                        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
                        "use_checkpointing": False, "use_convtranspose": False, "norm_float16": True,
                        "num_splits": 8, "dim_split": 1},
    "diffusion_unet_def": {"_target_": _UNET, "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels",
                           "out_channels": "@latent_channels", "num_channels": [64, 128, 256, 512],
                           "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
                           "num_res_blocks": 2, "use_flash_attention": True, "include_top_region_index_input": True,
                           "include_bottom_region_index_input": True, "include_spacing_input": True},
    "controlnet_def": {"_target_": _CN, "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels",
                       "num_channels": [64, 128, 256, 512], "attention_levels": [False, False, True, True],
                       "num_head_channels": [0, 0, 32, 32], "num_res_blocks": 2, "use_flash_attention": True,
                       "conditioning_embedding_in_channels": 8, "conditioning_embedding_num_channels": [8, 32, 64]},
}
_SCHEDULERS = {
    "ddpm": {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", "num_train_timesteps": 1000,
             "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False},
    "rflow": {"_target_": "scripts.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000,
              "use_discrete_timesteps": False, "use_timestep_transform": True, "sample_method": "logit-normal",
              "scale": 1.2},
}
#: the shrunk widths of the tiny networks (MONAI's test sizes)
_TINY = {
    "autoencoder_def": {"num_channels": [4, 4, 4], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4,
                        "norm_float16": False, "num_splits": 1},
    "diffusion_unet_def": {"num_channels": [8, 8, 8], "attention_levels": [False, False, True],
                           "num_head_channels": [0, 0, 8], "num_res_blocks": 1, "norm_num_groups": 8,
                           "use_flash_attention": False},
    "controlnet_def": {"num_channels": [8, 8, 8], "attention_levels": [False, False, True],
                       "num_head_channels": [0, 0, 8], "num_res_blocks": 1, "norm_num_groups": 8,
                       "use_flash_attention": False, "conditioning_embedding_num_channels": [8, 8, 8],
                       "use_checkpointing": False},
}
#: the spread given to the weights MONAI initialises at zero (see :func:`write_random_bundle`)
ZERO_INIT_STD = 0.02
#: a few names of the bundle vocabulary (configs/label_dict.json) for the tiny bundle
TINY_LABELS = {"liver": 1, "spleen": 3, "pancreas": 4, "right kidney": 5, "left kidney": 14, "hepatic tumor": 26,
               "bone lesion": 128, "body": 200}


def bundle_config(layout: Literal["ddpm", "rflow"], size: Literal["tiny", "published"]) -> dict[str, Any]:
    """The trimmed ``configs/inference.json`` of a bundle of ``layout`` (published or tiny widths)."""
    files = WEIGHT_FILES[layout]
    config: dict[str, Any] = {
        "imports": ["$import torch", "$from pathlib import Path", "$import scripts"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "trained_autoencoder_path": f"$@model_dir + '/{files[0]}'",
        "trained_diffusion_path": f"$@model_dir + '/{files[1]}'",
        "trained_controlnet_path": f"$@model_dir + '/{files[2]}'",
        "label_dict_json": "$@bundle_root + '/configs/label_dict.json'",
        "spatial_dims": 3, "image_channels": 1, "latent_channels": 4,
    }
    defs = copy.deepcopy(_PUBLISHED)
    if layout == "rflow":  # the 1.0 networks: modality classes, residual up/down sampling, fc attention
        defs["diffusion_unet_def"].update(include_top_region_index_input=False, include_bottom_region_index_input=False,
                                          num_class_embeds=128, resblock_updown=True, include_fc=True)
        defs["controlnet_def"].update(num_class_embeds=128, resblock_updown=True, include_fc=True)
    if size == "tiny":
        for key, change in _TINY.items():
            defs[key].update(copy.deepcopy(change))
    config.update(defs)
    config["noise_scheduler"] = dict(_SCHEDULERS[layout])
    return config


def _resolved(config: dict[str, Any], key: str) -> NetworkDef:
    raw = config[key]
    kwargs = {k: (config[v[1:]] if isinstance(v, str) and v.startswith("@") else v)
              for k, v in raw.items() if k != "_target_"}
    return NetworkDef(key, ALLOWED_TARGETS[raw["_target_"]], kwargs)


def write_random_bundle(root: str | Path, layout: Literal["ddpm", "rflow"] = "rflow",
                        size: Literal["tiny", "published"] = "tiny", *, seed: int = 0,
                        labels: dict[str, int] | None = None, scale_factor: float = 1.0) -> Path:
    """Write a bundle folder with random weights at ``root``: configs/inference.json, metadata.json,
    label_dict.json and the three weights files in the published key layout. Returns ``root``."""
    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    config = bundle_config(layout, size)
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": _VERSION[layout],
                                                                "name": "random weights (medsynth)"}))
    (root / "configs" / "label_dict.json").write_text(json.dumps(labels or TINY_LABELS, indent=2))
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae, unet, cn = (build(_resolved(config, k), cpu)
                        for k in ("autoencoder_def", "diffusion_unet_def", "controlnet_def"))
        with torch.no_grad():  # MONAI starts the UNet's output and the ControlNet's residual convolutions at
            for net in (unet, cn):  # zero; trained ones are not, and a zero UNet output passes no gradient
                for param in net.parameters():
                    if param.dim() > 1 and not param.any():
                        param.normal_(0.0, ZERO_INIT_STD)
    files = WEIGHT_FILES[layout]
    torch.save(ae.state_dict(), root / "models" / files[0])
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(scale_factor), "epoch": 0},
               root / "models" / files[1])
    torch.save({"controlnet_state_dict": cn.state_dict(), "epoch": 0}, root / "models" / files[2])
    return root
