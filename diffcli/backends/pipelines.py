"""Loading a model and picking its family; the pipeline functions of the Python API.

`load_family` loads a diffusers pipeline (`load_pipeline`) or a diffcli model file (`models.load_model`) and wraps
it in its `family.Family` (the first of `FAMILIES` that matches), so commands ask the family, never the network.
The functions below (`encode_prompts`, `decode`, `denoiser`, `sigmas`, ...) take a loaded pipeline (or its family)
and ask its family: every command that runs a text-to-image model (seg, panorama, anagram, pg) goes through one
of them, so SD 1.x/2.x, SDXL and DeepFloyd IF load, condition and decode one way.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..shared.cache import cached
from ..shared.errors import DiffcliError
from ..shared.inputs import input_path
from ..shared.devices import pick_device, pick_dtype
from ..shared.files import some_names
from ..core.denoisers import DiffusersDenoiser
from . import deepfloyd, diffusers_unet
from .deepfloyd import DeepFloydIF, DeepFloydIFSuperResolution
from .diffusers_unet import UNetPipeline
from .edm import DiffcliModel
from .family import Family
from .flow_flux import Flux
from .flow_sd3 import StableDiffusion3
from .models import load_model
from .stable_diffusion import StableDiffusion, StableDiffusionXL

initial_latents = diffusers_unet.initial_latents  # the Python API's names, kept where they always were
ConcatUNet = deepfloyd.ConcatUNet

# the diffusers pipeline families, first match wins (SDXL before SD; IF stage II before stage I)
FAMILIES: tuple[type[Family], ...] = (
    StableDiffusionXL, DeepFloydIFSuperResolution, DeepFloydIF, StableDiffusion,
    StableDiffusion3,  # flow_sd3.py: SD3 / SD3.5
    Flux,  # flow_flux.py: Flux.1 dev / schnell
)


def load_pipeline(spec: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  kind: str = "text-to-image", offload: bool = False, **components):
    """`DiffusionPipeline.from_pretrained` on a hub id or a local folder; the class comes from model_index.json.

    device None: cuda, then mps, then cpu; dtype None: fp16 on CUDA, else fp32.
    `components` replace parts of the pipeline (IF stage II: text_encoder=None, it reuses stage I's T5 embeddings).
    Within `cache.caching()` (a sweep) each pipeline loads once.
    """
    key = ("pipeline", spec, str(device), str(dtype), kind, offload,
           tuple(sorted((k, repr(v)) for k, v in components.items())))
    return cached(key, lambda: _load_pipeline(spec, device, dtype, kind, offload, **components))


FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def pipeline_class_name(spec: str) -> str | None:
    """The pipeline class a local folder's model_index.json names (None for hub ids and unreadable folders)."""
    try:
        return json.loads((Path(spec) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_flow(spec: str) -> bool:
    """Does `spec` name a flow transformer pipeline (its model_index.json; a hub id by its name)?"""
    return pipeline_class_name(spec) in FLOW_PIPELINES or bool(re.search(r"flux|stable-diffusion-3", spec, re.I))


def pipeline_dtype(name: str | None, device: torch.device, spec: str) -> torch.dtype:
    """`--dtype` for a pipeline: as asked, else bf16 on CUDA for the flow transformers (SD3, Flux: fp16 overflows
    in T5 and Flux), else `devices.pick_dtype`'s default (fp16 on CUDA, fp32 elsewhere)."""
    if name in (None, "", "auto") and torch.device(device).type == "cuda" and is_flow(spec):
        return torch.bfloat16
    return pick_dtype(name, torch.device(device))


def check_load_memory(spec: str, device: torch.device, dtype: torch.dtype, offload: bool) -> None:
    """Refuse, before loading, a local pipeline whose weights cannot sit on `device`: all components' safetensors
    (with --offload only the largest, as model CPU offload moves one model at a time), counted as stored: a lower
    bound when they are stored in the run's dtype."""
    from ..shared.memory import check_memory
    folder = Path(spec)
    if not folder.is_dir() or device.type != "cuda":
        return
    sizes = []
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        sizes.append(sum(f.stat().st_size for f in part.glob("*.safetensors")))
    if not sizes:
        return
    need = max(sizes) if offload else sum(sizes)
    what = "the largest model of the pipeline (--offload)" if offload else "the pipeline's weights"
    check_memory(need, device, f"{what} of {spec}", "pass --offload (diffusers' model CPU offload)" if not offload
                 else "use a smaller model")


def _load_pipeline(spec: str, device: torch.device | str | None, dtype: torch.dtype | None, kind: str,
                   offload: bool = False, **components):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # loading bars on stderr say nothing the command does not
    tlog.disable_progress_bar()
    device = pick_device(None if device is None else str(device))
    dtype = pick_dtype(None, device) if dtype is None else dtype
    if os.path.lexists(spec):  # a local pipeline: a folder that can be read (a loop or a dangling link: one line)
        input_path(spec, "--model pipeline folder", "folder")
    check_load_memory(spec, device, dtype, offload)
    pickled = pickled_weights(Path(spec)) if Path(spec).is_dir() else []
    components = {**{k: v for k, v in absent_components(Path(spec)).items() if k != "safety_checker"}, **components}
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
    if family_class(pipe) is None:
        raise DiffcliError(f"{spec!r} is a {type(pipe).__name__}; {UNSUPPORTED}")
    pipe.set_progress_bar_config(disable=True)
    if offload and device.type == "cuda":  # one model on the GPU at a time; on a CPU there is nothing to offload
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def absent_components(folder: Path) -> dict[str, None]:
    """Components a local pipeline folder saved as absent ([null, null] in model_index.json, e.g. SD3 without its
    T5): `from_pretrained` wants them passed as None."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}


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


UNSUPPORTED = ("diffcli runs SD 1.x/2.x, SDXL, DeepFloyd IF, SD3/SD3.5 and Flux.1 pipelines; other pipeline "
               "classes are not supported")


def family_class(pipe) -> type[Family] | None:
    return next((f for f in FAMILIES if f.matches(pipe)), None)


def pipeline_family(pipe) -> Family:
    """The family of a loaded diffusers pipeline (a `Family` passes through)."""
    if isinstance(pipe, Family):
        return pipe
    cls = family_class(pipe)
    if cls is None:
        raise DiffcliError(f"a {type(pipe).__name__}: {UNSUPPORTED}")
    return cls(pipe)


def load_family(spec: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                checkpoint: bool = False, kind: str = "text-to-image", kinds: tuple[str, ...] = ("edm",),
                offload: bool = False, **components) -> Family:
    """A model and its family: a diffusers pipeline (hub id or folder; `kind` words the load error, `components`
    replace its parts, see `load_pipeline`), or with `checkpoint` a diffcli model file of `kinds`
    (`models.load_model`; its net cast to `dtype` where one is given)."""
    if checkpoint:
        model, meta = load_model(spec, device if device is not None else "cpu", kinds=kinds)
        if dtype is not None:
            model.net.to(dtype)
        return DiffcliModel(model, meta)
    fam = pipeline_family(load_pipeline(spec, device, dtype, kind, offload, **components))
    if offload:
        fam.offload = True
    return fam


def sibling_differences(main: Any, guide: Any) -> list[str]:
    """What keeps pipeline `guide` from guiding pipeline `main` (autoguidance): each difference in words; [] for a
    sibling with the same latent space (family, latent channels, VAE scaling) and the same text conditioning (the
    UNet's cross-attention width, SDXL's added conditioning). The UNets may differ in width and depth, and the
    noise tables too (each adapter maps the one VE sigma to its own timesteps)."""
    a, b = pipeline_family(main), pipeline_family(guide)
    if a.name != b.name:
        return [f"family {b.name} (the model: {a.name})"]
    out = []
    ua, ub = main.unet.config, guide.unet.config
    for key, what in (("in_channels", "latent channels"), ("out_channels", "output channels"),
                      ("cross_attention_dim", "text embedding width (cross_attention_dim)"),
                      ("addition_embed_type", "added conditioning"),
                      ("projection_class_embeddings_input_dim", "added conditioning width"),
                      ("encoder_hid_dim", "text projection width")):
        if ua.get(key) != ub.get(key):
            out.append(f"{what} {ub.get(key)} (the model: {ua.get(key)})")
    va, vb = getattr(main, "vae", None), getattr(guide, "vae", None)
    if (va is None) != (vb is None):
        out.append("a VAE where the model has none" if vb is not None else "no VAE where the model has one")
    elif va is not None:
        for key in ("latent_channels", "scaling_factor", "shift_factor"):
            if va.config.get(key) != vb.config.get(key):
                out.append(f"VAE {key} {vb.config.get(key)} (the model: {va.config.get(key)})")
    return out


def load_guide(spec: str, main: Family, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Family:
    """Autoguidance's guide for pipeline `main`: a smaller sibling pipeline (`sibling_differences`), refused in one
    line that says what differs."""
    guide = load_family(spec, device, dtype, kind="autoguidance guide")
    differ = sibling_differences(main.pipe, guide.pipe) if hasattr(main, "pipe") and hasattr(guide, "pipe") else \
        [f"kind {guide.kind} (the model: {main.kind})"]
    if differ:
        raise DiffcliError(f"--ag-model {spec}: the guide must share the model's latent space and text conditioning; "
                           f"its {', '.join(differ)}")
    return guide


# ---------------------------------------------------------------- a loaded pipeline's questions, by function

def family(pipe) -> str:
    """'sdxl' (two text encoders, added time ids), 'if' (pixel space, T5; stage I or II) or 'sd' (SD 1.x/2.x)."""
    return pipeline_family(pipe).name


def scale_factor(pipe) -> int:
    """Pixels per latent cell (8 for SD's VAE, 1 for IF, which works in pixels)."""
    return pipeline_family(pipe).scale_factor


def default_size(pipe) -> int:
    return pipeline_family(pipe).native_size()


def check_size(pipe, height: int, width: int, names: tuple[str, str] = ("height", "width")) -> None:
    """Sizes the UNet can take (a multiple of its total downsampling); `names` word the error (commands: flags)."""
    pipeline_family(pipe).check_size(height, width, names)


def denoiser(pipe) -> DiffusersDenoiser:
    return pipeline_family(pipe).denoiser()


def sigmas(pipe, steps: int, device: torch.device | str | None = None, schedule: str = "scheduler",
           rho: float = 7.0) -> torch.Tensor:
    """The pipeline's sigmas under one of `samplers.SCHEDULES` (`UNetPipeline.sigmas`)."""
    return pipeline_family(pipe).sigmas(steps, device, schedule, rho)


def encode_prompts(pipe, prompts: list[str], negative: str | list[str] | None, height: int, width: int,
                   device: torch.device | str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cond, uncond) UNet keyword arguments, one row per prompt; `guidance.classifier_free` batches them.

    SDXL adds pooled text embeddings and the six micro-conditioning ids (original size, crop top-left,
    target size); we generate at the target size with no crop, as the SDXL pipeline does by default.
    """
    return pipeline_family(pipe).encode_prompts(prompts, negative, height, width, device)


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    return pipeline_family(pipe).latent_shape(height, width)


def decode(pipe, x: torch.Tensor, sigma_last: torch.Tensor | float) -> torch.Tensor:
    """Final sample (our form) -> images (N, 3, H, W) in [-1, 1] on the CPU."""
    return pipeline_family(pipe).decode(x, sigma_last)


def decoded_features(pipe, features):
    """x0_hat in the pipeline's sample space -> `features` of its decoded image (N, 3, H, W) in [-1, 1],
    differentiable (no clamp, no uint8): what PG's clip kernel compares. IF samples are the image itself."""
    decoded = pipeline_family(pipe).decoded
    return lambda x0: features(decoded(x0))


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
SIGMA_DATA = UNetPipeline.sigma_data


def clip_x0(model, pipe):
    """The scheduler's own limits on x0_hat as a denoiser combinator (`UNetPipeline.limit`): dynamic thresholding
    (IF), else clipping, else `model` itself (SD)."""
    return pipeline_family(pipe).limit(model)


def sr_denoiser(pipe) -> DiffusersDenoiser:
    return pipeline_family(pipe).denoiser()


def sr_condition(pipe, image: torch.Tensor, height: int, width: int, noise_level: int,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(upsampled stage-I image with noise at `noise_level`, the noise-level class labels) for IF stage II
    (`DeepFloydIFSuperResolution.condition`)."""
    return pipeline_family(pipe).condition(image, height, width, noise_level, noise)
