"""Pretrained diffusers pipelines as denoisers: load, encode prompts, draw and decode latents.

Every command that runs a text-to-image model (seg, panorama, anagram, pg) goes through here, so SD 1.x/2.x,
SDXL and DeepFloyd IF load, condition and decode one way. The pipeline's own `__call__` loop is never
used: the loop is `diffcli.core.samplers` over `DiffusersDenoiser` with the scheduler's sigmas.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..shared.cache import cached
from ..shared.errors import DiffcliError
from ..shared.devices import PerSampleRandn, pick_device, pick_dtype
from ..shared.files import some_names
from ..core.denoisers import DiffusersDenoiser, ve_to_vp, vp_to_ve
from ..core.samplers import get_sigmas_pipeline


def load_pipeline(spec: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  kind: str = "text-to-image", **components):
    """`DiffusionPipeline.from_pretrained` on a hub id or a local folder; the class comes from model_index.json.

    device None: cuda, then mps, then cpu; dtype None: fp16 on CUDA, else fp32.
    `components` replace parts of the pipeline (IF stage II: text_encoder=None, it reuses stage I's T5 embeddings).
    Within `cache.caching()` (a sweep) each pipeline loads once.
    """
    key = ("pipeline", spec, str(device), str(dtype), kind, tuple(sorted((k, repr(v)) for k, v in components.items())))
    return cached(key, lambda: _load_pipeline(spec, device, dtype, kind, **components))


def _load_pipeline(spec: str, device: torch.device | str | None, dtype: torch.dtype | None, kind: str,
                   **components):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # loading bars on stderr say nothing the command does not
    tlog.disable_progress_bar()
    device = pick_device(None if device is None else str(device))
    dtype = pick_dtype(None, device) if dtype is None else dtype
    pickled = pickled_weights(Path(spec)) if Path(spec).is_dir() else []
    if pickled:
        what = "is a pickled weight file" if len(pickled) == 1 else "are pickled weight files"
        raise DiffcliError(f"{spec}: {some_names(pickled)} {what} with no safetensors beside; {NO_PICKLES}")
    try:
        with warnings.catch_warnings():  # library deprecation chatter is not the user's business
            warnings.simplefilter("ignore")
            # never run code shipped with a model: no remote code, and safetensors weights only (no unpickling)
            pipe = DiffusionPipeline.from_pretrained(spec, dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False, trust_remote_code=False,
                                                     use_safetensors=True, **components)
    except Exception as e:  # hub errors, missing folders and bad configs all come as different types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "safetensors" in first:  # a component with pickled (.bin) weights only
            raise DiffcliError(f"cannot load {spec!r} ({first[:160]}); {NO_PICKLES}") from None
        repo = spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).exists() else "ORG/MODEL"
        raise DiffcliError(f"cannot load a {kind} pipeline from {spec!r} ({first[:160]}); get it with `hf download "
                           f"{repo} --local-dir DIR` where there is a network and pass the local folder"
                           ) from None
    if not hasattr(pipe, "unet"):
        raise DiffcliError(f"{spec!r} is a {type(pipe).__name__}; diffcli runs UNet pipelines (SD 1.x/2.x, SDXL, "
                           "DeepFloyd IF); transformer models (SD3, Flux) are not supported yet")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NO_PICKLES = ("diffcli loads pipeline weights from safetensors only and never unpickles (a pickle can run code): "
              "convert it once where you trust it, e.g. `DiffusionPipeline.from_pretrained(DIR)"
              ".save_pretrained(NEW_DIR)` (safetensors is the default), and pass NEW_DIR")


def pickled_weights(folder: Path) -> list[str]:
    """Pickled weight files (`component/name.bin`, ...) in a local pipeline folder's components that have no
    safetensors file beside them: what `from_pretrained` would otherwise unpickle."""
    found = []
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in part.iterdir() if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            found += [f"{part.name}/{f.name}" for f in sorted(files) if f.suffix in PICKLE_SUFFIXES]
    return found


def _device(pipe, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else pipe.unet.device


def family(pipe) -> str:
    """'sdxl' (two text encoders, added time ids), 'if' (pixel space, T5) or 'sd' (SD 1.x/2.x)."""
    if getattr(pipe, "text_encoder_2", None) is not None or type(pipe).__name__.startswith("StableDiffusionXL"):
        return "sdxl"
    if getattr(pipe, "vae", None) is None:
        return "if"
    return "sd"


def scale_factor(pipe) -> int:
    """Pixels per latent cell (8 for SD's VAE, 1 for IF, which works in pixels)."""
    return getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * scale_factor(pipe)


def check_size(pipe, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None:
    """Sizes the UNet can take (a multiple of its total downsampling); `names` word the error (commands: flags)."""
    f = scale_factor(pipe) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    for name, v in zip(names, (height, width)):
        if v < f or v % f:
            raise DiffcliError(f"{name} {v}: this model needs a positive multiple of {f} px")


def denoiser(pipe) -> DiffusersDenoiser:
    return DiffusersDenoiser.from_scheduler(pipe.unet, pipe.scheduler)


def sigmas(pipe, steps: int, device: torch.device | str | None = None, schedule: str = "scheduler",
           rho: float = 7.0) -> torch.Tensor:
    """The pipeline's sigmas under one of `samplers.SCHEDULES`: "scheduler", the DDIM timesteps of its noise table
    (ending where its DDIM ends: 0, or the table's first level); "karras", Karras sigmas (exponent `rho`) from the
    table's largest sigma to its smallest, then 0."""
    from diffusers import DDIMScheduler  # deferred like every diffusers import: `diffcli --help` stays fast

    return get_sigmas_pipeline(DDIMScheduler.from_config(pipe.scheduler.config), steps, schedule, _device(pipe, device),
                               rho)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative: str | list[str] | None, height: int, width: int,
                   device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) UNet keyword arguments, one row per prompt; `guidance.classifier_free` batches them.

    SDXL adds pooled text embeddings and the six micro-conditioning ids (original size, crop top-left,
    target size); we generate at the target size with no crop, as the SDXL pipeline does by default.
    """
    if isinstance(negative, str):
        negative = [negative] * len(prompts)
    device = _device(pipe, device)
    key = ("prompts", id(pipe), tuple(prompts), None if negative is None else tuple(negative), height, width, str(device))
    return cached(key, lambda: _encode_prompts(pipe, prompts, negative, height, width, device))


def _encode_prompts(pipe, prompts: list[str], negative: list[str] | None, height: int, width: int,
                    device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=negative)
    cond, uncond = {"encoder_hidden_states": out[0]}, {"encoder_hidden_states": out[1]}
    if family(pipe) == "sdxl":
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=out[2].dtype)
        time_ids = time_ids.expand(len(prompts), -1)
        cond["added_cond_kwargs"] = {"text_embeds": out[2], "time_ids": time_ids}
        uncond["added_cond_kwargs"] = {"text_embeds": out[3], "time_ids": time_ids}
    return cond, uncond


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    f = scale_factor(pipe)
    return pipe.unet.config.in_channels, height // f, width // f


def initial_latents(rng: PerSampleRandn, shape: tuple[int, ...], sigma_max: torch.Tensor | float) -> torch.Tensor:
    """Unit-variance noise as the scheduler draws it, in our x = x0 + sigma n form."""
    return vp_to_ve(rng.randn(shape), sigma_max)


@torch.no_grad()
def decode(pipe, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
    """Final sample (our form) -> images (N, 3, H, W) in [-1, 1] on the CPU."""
    latents = ve_to_vp(x, sigma_last)
    vae = getattr(pipe, "vae", None)
    if vae is None:  # IF: the sample is the image
        return latents.float().clamp(-1, 1).cpu()
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()
    return images.clamp(-1, 1).cpu()


def decoded_features(pipe, features):
    """x0_hat in the pipeline's sample space -> `features` of its decoded image (N, 3, H, W) in [-1, 1],
    differentiable (no clamp, no uint8): what PG's clip kernel compares. IF samples are the image itself."""
    vae = getattr(pipe, "vae", None)

    def decoded(x0: torch.Tensor) -> torch.Tensor:
        if vae is None:
            return features(x0)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return features(vae.decode((x0 / vae.config.scaling_factor + shift).to(vae.dtype)).sample)

    return decoded


def pipeline_kernel(pipe, opts, image_features=None):
    """The PG kernel a pipeline command asks for (--kernel, --pg-bandwidth), None with PG off. The clip kernel
    compares `image_features` (clip_model.image_features_fn) of the decoded x0_hat."""
    from ..core.particles import make_kernel
    if not opts.pg_factor:
        return None
    features = None
    if opts.kernel == "clip":
        if image_features is None:
            raise DiffcliError("--kernel clip needs a CLIP model (diffcli pg --clip-model/--clip-pretrained)")
        features = decoded_features(pipe, image_features)
    return make_kernel(opts.kernel, features, opts.pg_bandwidth)


# the data's std in the space pipelines sample (scaled latents, IF's pixels): PG's c_skip for --pg-grad skip
SIGMA_DATA = 1.0


def clip_x0(model, pipe):
    """The scheduler's own limits on x0_hat as a denoiser combinator: dynamic thresholding (IF's schedulers ask
    for it), else clipping, else `model` itself (SD). An Euler step from the limited x0_hat is DDIM with
    use_clipped_model_output=True, i.e. the 003 seed's psi(x_t, x0)."""
    c = pipe.scheduler.config
    if c.get("thresholding"):
        ratio, top = c.get("dynamic_thresholding_ratio", 0.995), c.get("sample_max_value", 1.0)

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
            x0 = model(x, sigma, **kw)
            s = torch.quantile(x0.flatten(1).abs(), ratio, dim=1).clamp(1, top).view(-1, *[1] * (x0.ndim - 1))
            return x0.clamp(-s, s) / s

        return denoise
    if c.get("clip_sample"):
        r = c.get("clip_sample_range", 1.0)
        return lambda x, sigma, **kw: model(x, sigma, **kw).clamp(-r, r)
    return model


# ---------------------------------------------------------------- DeepFloyd IF stage II (super-resolution)

def is_super_resolution(pipe) -> bool:
    """IF stage II: its UNet reads the noisy image and the upsampled stage-I image side by side."""
    return family(pipe) == "if" and hasattr(pipe, "image_noising_scheduler")


class ConcatUNet(torch.nn.Module):
    """Stage II's UNet behind the plain UNet call: the conditioning image (keyword `image`) is concatenated to
    the scaled noisy input, as IFSuperResolutionPipeline does, so `DiffusersDenoiser` and CFG run it unchanged."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, image: torch.Tensor, **kw: Any):
        return self.unet(torch.cat([sample, image.to(sample.dtype)], dim=1), timestep, **kw)


def sr_denoiser(pipe) -> DiffusersDenoiser:
    return DiffusersDenoiser.from_scheduler(ConcatUNet(pipe.unet), pipe.scheduler)


@torch.no_grad()
def sr_condition(pipe, image: torch.Tensor, height: int, width: int, noise_level: int,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(upsampled stage-I image with noise at `noise_level`, the noise-level class labels), as the pipeline makes
    them: bilinear with align_corners, then the image-noising scheduler's add_noise. `image` is (N, 3, h, w)."""
    steps = pipe.image_noising_scheduler.config.num_train_timesteps
    if not 0 <= noise_level < steps:
        raise DiffcliError(f"--noise-level must be in [0, {steps}), got {noise_level}")
    up = torch.nn.functional.interpolate(image.float(), (height, width), mode="bilinear", align_corners=True)
    labels = torch.full((up.shape[0],), noise_level, device=up.device, dtype=torch.long)
    up = pipe.image_noising_scheduler.add_noise(up, noise.to(up), labels)
    return up.to(pipe.unet.dtype), labels
