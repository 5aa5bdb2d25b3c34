"""A CLIP model through open_clip: the model (a name or a JSON config), its weights (a pretrained tag from the cache
or a download, or a local file read without unpickling code), its eval transform and tokenizer; and unit-length
image and text embeddings from it.

open_clip (and huggingface_hub, which it brings) is imported where it is used: it takes seconds to load, and only
the CLIP metrics need it.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..shared.errors import DiffcliError
from ..shared.memory import check_memory
from ..shared.libraries import quiet_libraries, reachable
from ..shared.files import read_json_option
from ..data.image_folders import open_image


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    name: str
    weights: str
    quick_gelu: bool


def resolve_clip_model(spec: str) -> str:
    """An open_clip model name, or a JSON model config file registered under its file name (stem)."""
    import open_clip
    if spec.endswith(".json"):
        path = Path(spec)
        cfg = read_json_option(spec, "CLIP model", "config file")
        if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
            raise DiffcliError(f"CLIP model {spec} is not an open_clip model config "
                               "(needs embed_dim, vision_cfg, text_cfg)")
        check_clip_config(cfg, spec)
        open_clip.add_model_config(path)
        return path.stem
    if spec not in open_clip.list_models():
        raise DiffcliError(f"unknown CLIP model {spec!r} "
                           "(open_clip names such as ViT-B-32, or a JSON model config file)")
    return spec


# the fields of an open_clip config that size its tensors: (low, high); other fields open_clip checks itself
_CLIP_SIZES = {"vision_cfg": {"layers": (1, 256), "width": (1, 16_384), "head_width": (1, 16_384),
                              "patch_size": (1, 4_096), "image_size": (1, 4_096)},
               "text_cfg": {"context_length": (1, 4_096), "vocab_size": (1, 1_000_000), "width": (1, 16_384),
                            "heads": (1, 1_024), "layers": (1, 256)}}


def check_clip_config(cfg: dict[str, Any], spec: str) -> None:
    """A CLIP model config file's types and sizes, checked before open_clip allocates anything: a wrong field type
    or a tower too large for this machine is a one-line error naming the field."""
    from ..shared.limits import count, finite
    count(f"CLIP model {spec}: embed_dim", cfg["embed_dim"], 1, 16_384)
    towers = 0
    for tower, sizes in _CLIP_SIZES.items():
        sub = cfg[tower]
        if not isinstance(sub, dict):
            raise DiffcliError(f"CLIP model {spec}: {tower} must be a JSON object, got {type(sub).__name__}")
        for key, (low, high) in sizes.items():
            if key in sub:
                values = sub[key] if isinstance(sub[key], list) and key in ("layers", "image_size") else [sub[key]]
                for v in values:
                    count(f"CLIP model {spec}: {tower}.{key}", v, low, high)
        if "mlp_ratio" in sub:
            finite(f"CLIP model {spec}: {tower}.mlp_ratio", sub["mlp_ratio"], above=True, high=64.0)
        layers = sub.get("layers", 12)
        layers = sum(layers) if isinstance(layers, list) else layers
        width = sub.get("width", 768)
        towers += 12 * layers * width * width + sub.get("vocab_size", 0) * width
    check_memory(4 * towers, "cpu", f"CLIP model {spec}: its weights", "this is no CLIP model one could evaluate with")


def _offline_message(model: str, tag: str, repo: str) -> str:
    return (f"the CLIP weights {model}/{tag} are not cached and cannot be downloaded here (offline); pass "
            f"pretrained=/path/to/open_clip_model.safetensors (or open_clip_pytorch_model.bin) from "
            f"huggingface.co/{repo}, or on a networked machine run `hf download {repo}` and copy "
            f"~/.cache/huggingface/hub to this one")


def fetch_tag_weights(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """A cached weights file for an open_clip pretrained tag, downloaded only where a network exists."""
    from open_clip.pretrained import download_pretrained
    hub = cfg.get("hf_hub", "")
    repo, filename = os.path.split(hub) if hub else ("", "")
    if repo:
        from huggingface_hub import constants, hf_hub_download
        wanted = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in wanted:
            try:
                return hf_hub_download(repo, name, local_files_only=True)
            except Exception:  # not cached under this name; try the next one
                pass
        if constants.HF_HUB_OFFLINE or not reachable(constants.ENDPOINT):
            raise DiffcliError(_offline_message(model, tag, repo))
    elif cfg.get("url") and not reachable(cfg["url"]):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if not cached.is_file():
            raise DiffcliError(f"the CLIP weights {model}/{tag} are not cached and cannot be downloaded here "
                               f"(offline); pass pretrained=/path/to/weights (safetensors or a state dict)")
    try:
        with quiet_libraries():
            return download_pretrained(cfg)
    except Exception as e:
        raise DiffcliError(f"could not download the CLIP weights {model}/{tag}: {str(e).splitlines()[0]}") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch.save state dict, never by unpickling code (weights_only=True)."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        if p.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: u64 header length, then JSON
            sd: Any = load_file(str(p))
        else:
            if zipfile.is_zipfile(p) and any(n.endswith("constants.pkl") or "/code/" in n
                                             for n in zipfile.ZipFile(p).namelist()):
                raise DiffcliError(f"{path} is a TorchScript archive (OpenAI's original ViT-B-32.pt?); diffcli reads "
                                   "CLIP weights only from safetensors or state dicts: use open_clip_model.safetensors "
                                   "from huggingface.co/timm/vit_base_patch32_clip_224.openai")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols; the error below says it all
                sd = torch.load(p, map_location="cpu", weights_only=True)
    except DiffcliError:
        raise
    except Exception as e:
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise DiffcliError(f"cannot read CLIP weights from {path} (safetensors or a plain torch state dict; "
                           f"pickled code is refused): {reason}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not (isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise DiffcliError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_clip(model_spec: str, pretrained: str, device: torch.device, quick_gelu: bool | None = None) -> Clip:
    """open_clip model + its eval transform + tokenizer; weights from a pretrained tag or a local file."""
    import open_clip
    name = resolve_clip_model(model_spec)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if not os.path.isfile(pretrained) else {}
    if tag_cfg:
        path, weights = fetch_tag_weights(name, pretrained, tag_cfg), f"{name}/{pretrained}"
    elif os.path.isfile(pretrained):
        # a local file is taken to hold the OpenAI weights of this architecture (the protocol's), if it has any
        path, weights = pretrained, pretrained
        tag_cfg = open_clip.get_pretrained_cfg(name, "openai")
    else:
        looks_like_path = os.sep in pretrained or Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors")
        if looks_like_path:
            raise DiffcliError(f"CLIP pretrained weights file not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise DiffcliError(f"unknown CLIP pretrained {pretrained!r} for {name} "
                           f"(tags: {', '.join(tags) or 'none'}; or a local weights file)")
    # open_clip >= 2.29 builds 'ViT-B-32' with GELU even for the OpenAI weights (trained with QuickGELU); the
    # 2024 grader's open_clip built QuickGELU for pretrained='openai', so follow the tag's record by default
    use_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    preprocess_cfg = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    state = read_state_dict(path)
    try:
        with quiet_libraries():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, force_quick_gelu=use_quick_gelu, **preprocess_cfg)
    except (TypeError, ValueError, KeyError, AssertionError, AttributeError) as e:  # a config open_clip refuses
        if isinstance(e, DiffcliError):
            raise
        raise DiffcliError(f"CLIP model {model_spec} does not build ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DiffcliError(f"{path} does not hold weights for CLIP model {name}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    model = model.to(device).eval().requires_grad_(False)
    return Clip(model, preprocess, open_clip.get_tokenizer(name), device, name, weights, use_quick_gelu)


# ---------------------------------------------------------------- embeddings (tensors in, tensors out)

def image_features_fn(clip: Clip) -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable image -> unit-length CLIP embedding map for images (N, 3, H, W) in [-1, 1]: bicubic resize
    of the whole image to the model's input size, then its mean/std normalisation (its eval transform without the
    centre crop and the uint8 rounding, so that gradients flow, as particle guidance's clip kernel needs)."""
    norm = next(t for t in getattr(clip.preprocess, "transforms", []) if type(t).__name__ == "Normalize")
    mean = torch.tensor(norm.mean, device=clip.device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=clip.device).view(1, -1, 1, 1)
    size = clip.model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    dtype = next(clip.model.parameters()).dtype

    def features(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.to(dtype) + 1) / 2, size=size, mode="bicubic", align_corners=False)
        return F.normalize(clip.model.encode_image((x - mean.to(dtype)) / std.to(dtype)), dim=-1)

    return features


@torch.inference_mode()
def encode_images(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) preprocessed images -> (N,D) unit-length CLIP image embeddings."""
    return F.normalize(model.encode_image(pixels).float(), dim=-1)


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(P,L) token ids -> (P,D) unit-length CLIP text embeddings."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def embed_image_files(clip: Clip, paths: Sequence[str], batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Read, preprocess and encode images `batch_size` at a time (the grader encodes them one by one).

    Each image reaches the preprocess as opened, in its own mode, as in the grader's `preprocess(Image.open(path))`:
    CLIP's transform resizes (bicubic) and crops first and converts to RGB only then, so RGBA is resized with
    premultiplied alpha, palette images nearest-neighbour, 16-bit ones at their depth, exactly as graded."""
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = torch.stack([preprocess(clip, p) for p in chunk]).to(clip.device)
        out.append(encode_images(clip.model, pixels).cpu())
        if on_batch:
            on_batch(len(chunk))
    return torch.cat(out)


def preprocess(clip: Clip, path: str) -> torch.Tensor:
    """CLIP's preprocess of one image file as opened (the grader's `preprocess(Image.open(path))`)."""
    image = open_image(path)
    try:
        return clip.preprocess(image)
    except (OSError, ValueError) as e:  # a mode PIL cannot resize or convert: the grader stops there too
        raise DiffcliError(f"cannot preprocess image {path} (mode {image.mode}): {str(e).splitlines()[0]}") from None


def embed_prompts(clip: Clip, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    tokens = clip.tokenizer(list(prompts))
    return torch.cat([encode_texts(clip.model, tokens[i:i + batch_size].to(clip.device)).cpu()
                      for i in range(0, len(prompts), batch_size)])
