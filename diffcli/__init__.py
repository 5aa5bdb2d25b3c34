"""diffcli: train, sample and guide diffusion models, from the command line or from Python.

The library under the commands, importable as `import diffcli as dc`. Every method is written against one
denoiser interface, D(x, sigma, **cond) -> x0_hat with x = x0 + sigma * noise:

- models:    `load_model` (a diffcli checkpoint, e.g. `SHIPPED_MODEL`), `load_pipeline` + `pipeline_denoiser`
             (any SD 1.x/2.x, SDXL or DeepFloyd IF diffusers pipeline), `encode_prompts`, `initial_latents`, `decode`;
             `load_family` (either, as a `Family`: the one interface a model family implements)
- guidance:  `stack` (CFG, SEG and PG on one denoiser, in one order), `classifier_free`, `Seg` + `parse_blur`,
             `PG` + `rbf_grad` / `make_kernel`, `particle_guidance`, `class_particle_guidance` (the class-posterior
             kernel: `class_posterior`, `posterior_push`)
- sampling:  `run_sampler` by name (`SAMPLERS`), or `sample_euler`, `sample_heun`, `sample_dpmpp_2m`, ...;
             schedules `get_sigmas_karras`, `pipeline_sigmas`; per-sample seeded noise `PerSampleRandn`
- views:     `ViewSet`, `make_view`, `windows`, `synchronized`, `sample_views` (panorama / anagram synchronization)
- metrics:   `frechet_distance`, `kernel_distance`, `mean_pairwise_cosine`, `digit_record`, `anagram_scores`

Library functions return tensors and never print or write files; bad input raises `DiffcliError`, a ValueError.
Names load on first use, so `import diffcli` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "shared.errors": ("DiffcliError",),
    "shared.devices": ("PerSampleRandn", "pick_device", "pick_dtype"),
    "shared.images": ("load_images",),
    "shared.shipped": ("SHIPPED_MODEL", "SHIPPED_CLASSIFIER", "SHIPPED_BLURRING", "SHIPPED_CIRCLE", "checkpoint", "prompts"),
    "backends.models": ("load_model",),
    "core.denoisers": ("Denoiser", "EDMPrecond", "DiffusersDenoiser"),
    "backends.pipelines": ("load_pipeline", "load_family", "encode_prompts", "decode", "latent_shape"),
    "backends.diffusers_unet": ("initial_latents",),
    "backends.family": ("Family",),
    "core.guidance": ("stack", "classifier_free", "smoothed_energy", "particle_guidance", "class_particle_guidance", "Seg",
                      "PG", "Guidance", "Pag", "Apg", "ZeroStar", "perturbed_guidance"),
    "core.query_blur": ("parse_blur",),
    "core.particles": ("rbf_grad", "make_kernel", "feature_grad", "class_posterior", "posterior_push"),
    "core.samplers": ("SAMPLERS", "SCHEDULES", "run_sampler", "get_sigmas_karras", "sample_euler", "sample_heun",
                 "sample_stochastic_heun", "sample_ddim", "sample_euler_ancestral", "sample_dpmpp_2m", "nfe",
                 "sample_euler_cfg_pp", "sample_dpmpp_2m_cfg_pp"),
    "core.views": ("ViewSet", "make_view", "windows", "VIEWS"),
    "core.sync": ("synchronized", "sample_views"),
    "core.metrics": ("frechet_distance", "kernel_distance", "mean_pairwise_cosine", "digit_record", "anagram_scores"),
}
_ALIASES = {"pipeline_denoiser": ("backends.pipelines", "denoiser"), "pipeline_sigmas": ("backends.pipelines", "sigmas")}
_WHERE = {name: (module, name) for module, names in _EXPORTS.items() for name in names} | _ALIASES

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'diffcli' has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
