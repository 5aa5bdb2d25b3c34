"""diffcli eval: the 003 CLIP-score protocol exactly, Visual Anagrams metrics, FID/KID through clean-fid, digit metrics.

Input is checked where it is read (folders, file names, images, weights) and problems raise DiffcliError; the
metric functions take tensors (or clean-fid's numpy features) and return them; `run` assembles eval.json and
returns what the command prints. Under torchrun the ranks share the reading and the per-image networks, and rank 0
computes every aggregate from the gathered values and writes the eval.json one process would (see `run`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from .common import DiffcliError, progress_bar, write_json
from .dist import Dist

APPS = ("wide_images", "ambiguous_images")
FEATURES = ("inception", "mnist")
EVAL_FILE = "eval.json"
OTHER_FAMILIES = ("fid", "kid", "digits")  # eval.json keys a CLIP run leaves in place; the rest is the CLIP part
GRADES = ((0.28, "full marks"), (0.26, "half marks"))  # 003's thresholds on the CLIP score
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# clean-fid's precomputed Inception statistics: name -> (default resolution, default split)
DATASET_STATS = {"cifar10": (32, "train"), "ffhq": (1024, "trainval70k"), "lsun_church": (256, "train"),
                 "afhq_cat": (512, "train"), "afhq_dog": (512, "train"), "afhq_wild": (512, "train"),
                 "metfaces": (1024, "train")}
SAMPLE_ARTIFACTS = ("grid.png", "strip.png")  # written beside the samples by `diffcli sample`
T, R = TypeVar("T"), TypeVar("R")
Rows = Any  # a tensor or an array with one row per image, or a tuple of them


@dataclass
class EvalConfig:
    folder: str                        # as typed: the grader writes it verbatim into eval.json
    app: str | None = None
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    quick_gelu: bool | None = None     # None: what the weights were trained with (OpenAI: QuickGELU)
    anagram_prompts: str | None = None
    drop_panoramas: bool = False
    fid: str | None = None
    kid: str | None = None
    features: str = "inception"
    classifier: str | None = None
    digits: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    batch_size: int = 64
    device: str | None = None


# ================================================================ reading: folders, names, images

def check_folder(path: str | Path, what: str = "folder") -> Path:
    path = Path(path)
    if not path.exists():
        raise DiffcliError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DiffcliError(f"{what} {path} is not a folder")
    return path


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_image(path: str | Path, mode: str = "RGB"):
    """Open and fully decode one image, converted with PIL's convert(mode) as the grader does; name a bad file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode), im.mode
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffcliError(f"cannot read image {path}: {reason} (corrupt or truncated file?)") from None


def read_each(dist: Dist | None, paths: Sequence[T], read: Callable[[T], R],
              mine: Sequence[T] | None = None) -> list[R]:
    """read(path) for this rank's paths `mine` (default: its `Dist.shard` of `paths`; one process: all of them).

    A file that cannot be read stops every rank with the error one process gives: the first bad file in `paths`.
    """
    if dist is None or dist.world == 1:
        return [read(p) for p in paths]
    out, failure = [], None
    for p in dist.shard(paths) if mine is None else mine:
        try:
            out.append(read(p))
        except DiffcliError as e:
            failure = (paths.index(p), e)
            break
    dist.raise_first(failure)
    return out


def check_images(paths: Sequence[str | Path], dist: Dist | None = None) -> dict[str, list[str]]:
    """Decode every image once before any model runs (so a bad file is named up front); modes -> file names.

    Under torchrun each rank decodes its share and the modes come back to rank 0 (the others get {}).
    """
    modes_in_order = read_each(dist, paths, lambda p: read_image(p)[1])
    if dist is not None:
        modes_in_order = dist.gather(modes_in_order) or []
    modes: dict[str, list[str]] = {}
    for p, mode in zip(paths, modes_in_order):
        modes.setdefault(mode, []).append(Path(p).name)
    return modes


def conversion_warnings(modes: dict[str, list[str]]) -> list[str]:
    out = []
    wide = [n for m in ("I;16", "I;16B", "I;16L", "I", "F") for n in modes.get(m, [])]
    alpha = [n for m in ("RGBA", "LA", "PA", "RGBa", "La") for n in modes.get(m, [])]
    if wide:
        out.append(f"{len(wide)} image(s) have 16/32-bit pixels and are converted with PIL convert('RGB') as the "
                   f"grader does, which clips values above 255 rather than rescaling them: {_names(wide)}")
    if alpha:
        out.append(f"{len(alpha)} image(s) have an alpha channel, dropped by convert('RGB') as the grader does: "
                   f"{_names(alpha)}")
    return out


def list_pngs(folder: str) -> tuple[list[str], list[str]]:
    """The *.png names the grader reads (sorted) and warnings about the image files it would not read."""
    path = check_folder(folder)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if not files:
        raise DiffcliError(f"folder {folder} is empty: no images to score")
    pngs = [n for n in files if n.endswith(".png")]
    others = [n for n in files if not n.endswith(".png") and Path(n).suffix.lower() in IMAGE_EXTS]
    if not pngs:
        found = (f" (it holds {len(others)} other image(s): {_names(others)}; the grader reads only *.png)"
                 if others else "")
        raise DiffcliError(f"no PNG images in {folder}{found}")
    notes = [f"skipped {len(others)} non-PNG image(s), as the grader reads only *.png: {_names(others)}"]
    return pngs, notes if others else []


def prompt_from_name(name: str, app: str) -> str | None:
    """The grader's prompt for a file: wide drops the last `_`-token (crop position), ambiguous maps `_` to space.

    None for a name outside the protocol (hidden file, or nothing left for a prompt).
    """
    if name.startswith("."):
        return None
    tokens = name[:-len(".png")].split("_")
    if app == "wide_images":
        tokens = tokens[:-1]
    prompt = " ".join(tokens)
    return prompt if prompt.strip() else None


def has_crop_position(name: str) -> bool:
    return name[:-len(".png")].rsplit("_", 1)[-1].isdigit()


@dataclass
class ClipFile:
    name: str
    path: str      # os.path.join(source_dir as typed, name): the grader's key for a prompt's first image
    prompt: str


def plan_clip_files(folder: str, app: str, drop_panoramas: bool = False) -> tuple[list[ClipFile], list[str]]:
    """The files the grader scores, each with its prompt, and warnings naming what it does with odd names."""
    pngs, notes = list_pngs(folder)
    files, bad, panoramas = [], [], []
    for name in pngs:
        prompt = prompt_from_name(name, app)
        if prompt is None:
            bad.append(name)
            continue
        if app == "wide_images" and not has_crop_position(name):
            panoramas.append(f"{name} -> '{prompt}'")
            if drop_panoramas:
                continue
        files.append(ClipFile(name, os.path.join(folder, name), prompt))
    if not files:
        why = f"; skipped: {_names(bad)}" if bad else ""
        raise DiffcliError(f"none of the {len(pngs)} PNG(s) in {folder} is named as the {app} protocol expects"
                           f" ({'<prompt>_<crop position>.png' if app == 'wide_images' else '<prompt>.png'}){why}")
    if bad:
        notes.append(f"skipped {len(bad)} PNG(s) whose names give no prompt under the {app} protocol: {_names(bad)}")
    if panoramas and drop_panoramas:
        notes.append(f"--drop-panoramas: left out {len(panoramas)} file(s) with no crop position (the grader would "
                     f"score them, so this score differs from its): {_names(panoramas)}")
    elif panoramas:
        notes.append(f"{len(panoramas)} file(s) have no crop position (a full panorama left in the folder?); the "
                     f"grader scores each under its name minus the last word, usually as a prompt group of its own, "
                     f"and so does this score (--drop-panoramas leaves them out): {_names(panoramas)}")
    return files, notes


def group_prompts(files: Sequence[ClipFile]) -> tuple[list[str], list[str], torch.Tensor]:
    """Prompts in order of first appearance, the first file path of each, and each file's prompt index."""
    order: dict[str, int] = {}
    first_paths: list[str] = []
    for f in files:
        if f.prompt not in order:
            order[f.prompt] = len(order)
            first_paths.append(f.path)
    return list(order), first_paths, torch.tensor([order[f.prompt] for f in files], dtype=torch.long)


def read_json_option(path: str, option: str, what: str) -> Any:
    """A JSON file named by an option; a missing or malformed file is a one-line error naming the option."""
    p = Path(path)
    if not p.is_file():
        raise DiffcliError(f"{option} {what} not found: {path}")
    try:
        return json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffcliError(f"{option} {path} is not valid JSON: {e}") from None


def read_anagram_pairs(path: str) -> dict[str, tuple[str, str]]:
    """003's ambiguous_image_prompts.json: key -> (canonical_prompt, instance_prompt); the prompt fields count."""
    data = read_json_option(path, "--anagram-metrics", "prompt file")
    pairs = {}
    for key, rec in (data.items() if isinstance(data, dict) else []):
        if not (isinstance(rec, dict) and isinstance(rec.get("canonical_prompt"), str)
                and isinstance(rec.get("instance_prompt"), str)):
            raise DiffcliError(f"{path}: entry {key!r} needs string fields canonical_prompt and instance_prompt")
        pairs[key] = (rec["canonical_prompt"], rec["instance_prompt"])
    if not pairs:
        raise DiffcliError(f"{path} holds no anagram pairs ({{key: {{canonical_prompt, instance_prompt}}}})")
    return pairs


# ================================================================ CLIP model and weights

@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    name: str
    weights: str
    quick_gelu: bool


@contextlib.contextmanager
def quiet_libraries():
    """open_clip/huggingface log warnings and progress bars we restate ourselves (or that do not apply)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def resolve_clip_model(spec: str) -> str:
    """An open_clip model name, or a JSON model config file registered under its file name (stem)."""
    import open_clip
    if spec.endswith(".json"):
        path = Path(spec)
        cfg = read_json_option(spec, "--clip-model", "config file")
        if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
            raise DiffcliError(f"--clip-model {spec} is not an open_clip model config "
                               "(needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if spec not in open_clip.list_models():
        raise DiffcliError(f"unknown --clip-model {spec!r} "
                           "(open_clip names such as ViT-B-32, or a JSON model config file)")
    return spec


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test, so that an offline machine gets our message now, not after minutes of retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(model: str, tag: str, repo: str) -> str:
    return (f"the CLIP weights {model}/{tag} are not cached and cannot be downloaded here (offline); pass "
            f"--clip-pretrained /path/to/open_clip_model.safetensors (or open_clip_pytorch_model.bin) from "
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
        if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
            raise DiffcliError(_offline_message(model, tag, repo))
    elif cfg.get("url") and not _reachable(cfg["url"]):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if not cached.is_file():
            raise DiffcliError(f"the CLIP weights {model}/{tag} are not cached and cannot be downloaded here "
                               f"(offline); pass --clip-pretrained /path/to/weights (safetensors or a state dict)")
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
            from safetensors.torch import load_file
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
            raise DiffcliError(f"--clip-pretrained weights file not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise DiffcliError(f"unknown --clip-pretrained {pretrained!r} for {name} "
                           f"(tags: {', '.join(tags) or 'none'}; or a local weights file)")
    # open_clip >= 2.29 builds 'ViT-B-32' with GELU even for the OpenAI weights (trained with QuickGELU); the
    # 2024 grader's open_clip built QuickGELU for pretrained='openai', so follow the tag's record by default
    use_quick_gelu = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    preprocess_cfg = {f"image_{k}": tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    state = read_state_dict(path)
    with quiet_libraries():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=use_quick_gelu, **preprocess_cfg)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DiffcliError(f"{path} does not hold weights for CLIP model {name}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    model = model.to(device).eval().requires_grad_(False)
    return Clip(model, preprocess, open_clip.get_tokenizer(name), device, name, weights, use_quick_gelu)


# ================================================================ CLIP metrics (tensors in, tensors out)

@torch.inference_mode()
def encode_images(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) preprocessed images -> (N,D) unit-length CLIP image embeddings."""
    return F.normalize(model.encode_image(pixels).float(), dim=-1)


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(P,L) token ids -> (P,D) unit-length CLIP text embeddings."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def cosine_per_image(image_emb: torch.Tensor, text_emb: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """Raw cosine similarity of each image with its own prompt (no x100, unlike torchmetrics' CLIPScore)."""
    return (image_emb * text_emb[prompt_index]).sum(-1)


def group_means(values: torch.Tensor, group_index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` within each group (float64, as the grader's Python floats)."""
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, values.double())
    return sums / torch.bincount(group_index, minlength=n_groups).double()


def anagram_scores(sim: torch.Tensor, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual Anagrams: (P,V,V) view x prompt cosine matrices -> alignment and concealment per pair.

    Alignment is the worst view's similarity with its own prompt (min of the diagonal); concealment is the mean
    of the diagonals of the softmax over prompts (each view picks its prompt) and over views (each prompt picks
    its view), at CLIP's own temperature.
    """
    alignment = sim.diagonal(dim1=-2, dim2=-1).min(-1).values
    logits = logit_scale * sim.double()
    by_prompt = logits.softmax(-1).diagonal(dim1=-2, dim2=-1)
    by_view = logits.softmax(-2).diagonal(dim1=-2, dim2=-1)
    return alignment, (by_prompt.mean(-1) + by_view.mean(-1)) / 2


def embed_image_files(clip: Clip, paths: Sequence[str], batch_size: int,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Read, preprocess and encode images `batch_size` at a time (the grader encodes them one by one)."""
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = torch.stack([clip.preprocess(read_image(p)[0]) for p in chunk]).to(clip.device)
        out.append(encode_images(clip.model, pixels).cpu())
        if on_batch:
            on_batch(len(chunk))
    return torch.cat(out)


def embed_prompts(clip: Clip, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    tokens = clip.tokenizer(list(prompts))
    return torch.cat([encode_texts(clip.model, tokens[i:i + batch_size].to(clip.device)).cpu()
                      for i in range(0, len(prompts), batch_size)])


def clip_score_record(source_dir: str, first_paths: Sequence[str], prompt_means: torch.Tensor) -> dict[str, Any]:
    """The grader's eval.json layout: source_dir, the first image path of each prompt -> its mean, score."""
    record: dict[str, Any] = {"source_dir": source_dir}
    record.update({p: float(m) for p, m in zip(first_paths, prompt_means)})
    record["score"] = float(prompt_means.mean())
    return record


def anagram_record(pairs: dict[str, tuple[str, str]], prompts: Sequence[str], first_paths: Sequence[str],
                   image_emb: torch.Tensor, prompt_index: torch.Tensor, text_emb: torch.Tensor,
                   logit_scale: float, prompts_file: str) -> tuple[dict[str, Any], list[str]]:
    """Alignment/concealment per pair (views = the images named by the pair's two prompts) and their means."""
    first_image = {p: int((prompt_index == i).nonzero()[0]) for i, p in enumerate(prompts)}
    kept, missing, sims = [], [], []
    for key, views in pairs.items():
        absent = [p for p in views if p not in first_image]
        if absent:
            missing.append(f"{key} (no {', '.join(p.replace(' ', '_') + '.png' for p in absent)})")
            continue
        img = image_emb[[first_image[p] for p in views]]
        txt = text_emb[[prompts.index(p) for p in views]]
        sims.append(img @ txt.T)
        kept.append((key, views))
    if not kept:
        expected = [p.replace(" ", "_") + ".png" for p in next(iter(pairs.values()))]
        raise DiffcliError(f"--anagram-metrics: no pair of {prompts_file} has both of its images in the folder "
                           f"(expected e.g. {_names(expected)})")
    sim = torch.stack(sims)
    alignment, concealment = anagram_scores(sim, logit_scale)
    per_pair = {key: {"views": [first_paths[prompts.index(p)] for p in views], "prompts": list(views),
                      "similarity": [[float(v) for v in row] for row in s],
                      "alignment": float(a), "concealment": float(c)}
                for (key, views), s, a, c in zip(kept, sim, alignment, concealment)}
    record = {"prompts_file": prompts_file, "logit_scale": float(logit_scale), "pairs": per_pair,
              "alignment": float(alignment.double().mean()), "concealment": float(concealment.mean())}
    notes = [f"--anagram-metrics: skipped {len(missing)} pair(s) with a view missing: {_names(missing)}"]
    return record, notes if missing else []


# ================================================================ FID / KID through clean-fid

@dataclass
class Reference:
    spec: str
    folder: str | None = None
    dataset: tuple[str, int, str] | None = None    # (name, resolution, split) of clean-fid's statistics


def parse_reference(spec: str, option: str) -> Reference:
    """A reference folder, or NAME[:RES[:SPLIT]] of a dataset clean-fid has precomputed statistics for."""
    path = Path(spec)
    if path.is_dir():
        return Reference(spec, folder=spec)
    if path.exists():
        raise DiffcliError(f"{option} reference {spec} is not a folder")
    name, *rest = spec.split(":")
    if name.lower() in DATASET_STATS and len(rest) <= 2:
        res, split = DATASET_STATS[name.lower()]
        try:
            res = int(rest[0]) if rest and rest[0] else res
        except ValueError:
            raise DiffcliError(f"{option} {spec}: the resolution must be an integer (NAME:RES:SPLIT)") from None
        return Reference(spec, dataset=(name.lower(), res, rest[1] if len(rest) == 2 else split))
    raise DiffcliError(f"{option} reference folder not found: {spec} (nor a dataset clean-fid has statistics "
                       f"for: {', '.join(DATASET_STATS)})")


def cleanfid_listing(folder: str) -> list[str]:
    """The image files clean-fid's get_folder_features reads in a folder (recursive, its extensions)."""
    from cleanfid.utils import EXTENSIONS
    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def is_sample_folder(folder: str) -> bool:
    try:
        record = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") == "sample"


def feature_files(folder: str, what: str, dist: Dist | None = None) -> tuple[list[str], list[str]]:
    """clean-fid's file list for a folder, minus the grid/strip `diffcli sample` writes beside its samples."""
    files, notes = cleanfid_listing(str(check_folder(folder, what))), []
    if is_sample_folder(folder):
        extra = [f for f in files if Path(f).parent == Path(folder) and Path(f).name in SAMPLE_ARTIFACTS]
        if extra:
            files = [f for f in files if f not in extra]
            notes.append(f"left {', '.join(Path(f).name for f in extra)} of `diffcli sample` out of the {what} images")
    if len(files) < 2:
        raise DiffcliError(f"{what} {folder} has {len(files)} image(s); FID/KID need at least 2")
    check_images([f for f in files if not f.endswith(".npy")], dist)
    return files, notes


def digit_feature_fn(classifier: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid hands extractors (N,3,H,W) floats in [0, 255]; the digit classifier reads grey [-1, 1]."""
    def features(batch: torch.Tensor) -> torch.Tensor:
        return classifier.features(batch.mean(1, keepdim=True) / 127.5 - 1)
    return features


def inception_extractor(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from cleanfid.downloads_helper import inception_url
    from cleanfid.features import build_feature_extractor
    local = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid keeps it
    if not local.is_file() and not _reachable(inception_url):
        raise DiffcliError(f"clean-fid's Inception weights are not in {local} and cannot be downloaded here "
                           f"(offline): copy {inception_url} there, or score digits with --features mnist")
    try:
        with quiet_libraries():
            return build_feature_extractor("clean", device, use_dataparallel=False)
    except Exception as e:
        raise DiffcliError(f"could not load clean-fid's Inception network: {str(e).splitlines()[0]}") from None


def folder_features(files: Sequence[str], extractor: Callable, resize: Callable | None, batch_size: int,
                    device: torch.device, verbose: bool = True) -> np.ndarray:
    """Features through clean-fid's own reader (PIL convert('RGB'), clean resize) with mode='clean'."""
    from cleanfid import fid
    return fid.get_files_features(list(files), extractor, num_workers=0, batch_size=batch_size, device=device,
                                  mode="clean", custom_fn_resize=resize,
                                  verbose=verbose and sys.stderr.isatty())


def frechet_distance(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    from cleanfid import fid
    with contextlib.redirect_stdout(io.StringIO()):
        return float(fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma))


def kernel_distance(feats: np.ndarray, ref_feats: np.ndarray, subsets: int, subset_size: int, seed: int = 0) -> float:
    """clean-fid's KID estimator (cubic polynomial kernel, unbiased MMD^2 over random subsets), seeded."""
    from cleanfid import fid
    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its subsets from numpy's global generator
    try:
        return float(fid.kernel_distance(ref_feats, feats, num_subsets=subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


def reference_statistics(ref: Reference, metric: str):
    from cleanfid.features import get_reference_statistics
    name, res, split = ref.dataset
    try:
        with quiet_libraries():
            return get_reference_statistics(name, res, mode="clean", split=split, metric=metric)
    except Exception as e:
        raise DiffcliError(f"clean-fid's {metric} statistics for {name} {res} {split} are not cached and could not "
                           f"be downloaded ({str(e).splitlines()[0]}); pass a reference folder instead") from None


# ================================================================ digits

def read_digit_samples(folder: str) -> tuple[list[str], list[int] | None, list[str]]:
    """The samples `diffcli sample` recorded in run.json (file, label); without one, every PNG, unlabelled."""
    path = check_folder(folder)
    run_json = path / "run.json"
    if not run_json.is_file():
        pngs, notes = list_pngs(folder)
        pngs = [n for n in pngs if n not in SAMPLE_ARTIFACTS and not n.startswith(".")]
        if not pngs:
            raise DiffcliError(f"no sample PNGs in {folder}")
        notes.append(f"no run.json in {folder}: no labels, so no class accuracy ({len(pngs)} PNGs)")
        return [str(path / n) for n in pngs], None, notes
    try:
        samples = json.loads(run_json.read_text()).get("samples")
    except (ValueError, AttributeError):
        raise DiffcliError(f"{run_json} is not a diffcli run record (JSON with a samples list)") from None
    if not (isinstance(samples, list) and samples and all(isinstance(s, dict) and "file" in s for s in samples)):
        raise DiffcliError(f"{run_json} lists no samples (expected samples: [{{file, seed, label}}] "
                           "from diffcli sample)")
    files = [str(path / s["file"]) for s in samples]
    missing = [s["file"] for s in samples if not (path / s["file"]).is_file()]
    if missing:
        raise DiffcliError(f"{run_json} lists {len(missing)} sample(s) missing from the folder: {_names(missing)}")
    labels = [s.get("label") for s in samples]
    if any(y is None for y in labels):
        return files, None, [f"{run_json} records no labels (unconditional samples): no class accuracy"]
    if not all(isinstance(y, int) for y in labels):
        raise DiffcliError(f"{run_json}: sample labels must be integers")
    return files, labels, []


def read_digit(path: str, size: int = 28) -> np.ndarray:
    """Greyscale uint8 (size,size); other sizes are resized (bilinear) for the classifier."""
    from PIL import Image
    im, _ = read_image(path, mode="L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im)


def stack_digits(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays))[:, None]


def load_digits(files: Sequence[str], size: int = 28) -> torch.Tensor:
    """Greyscale uint8 (N,1,size,size); other sizes are resized (bilinear) for the classifier."""
    return stack_digits([read_digit(f, size) for f in files])


@torch.inference_mode()
def classify(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 digits -> (logits, 128-d penultimate features)."""
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        f = classifier.features(x)
        feats.append(f.cpu())
        logits.append(classifier.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


def mean_pairwise_cosine(feats: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs i != j (PG's in-batch similarity; higher = less diverse)."""
    f = F.normalize(feats.double(), dim=-1)
    n = len(f)
    s = f @ f.T
    return (s.sum() - s.diagonal().sum()) / (n * (n - 1))


def digit_record(logits: torch.Tensor, feats: torch.Tensor, labels: list[int] | None) -> dict[str, Any]:
    pred = logits.argmax(1)
    record: dict[str, Any] = {"n": len(pred), "modes_discovered": int(pred.unique().numel()),
                              "predicted_classes": torch.bincount(pred, minlength=logits.shape[1]).tolist(),
                              "mean_similarity": float(mean_pairwise_cosine(feats)) if len(pred) > 1 else None}
    if labels is not None:
        y = torch.tensor(labels)
        record["accuracy"] = float((pred == y).double().mean())
        record["classes_requested"] = int(y.unique().numel())
        within = [mean_pairwise_cosine(feats[y == k]) for k in y.unique() if int((y == k).sum()) > 1]
        record["mean_similarity_within_label"] = float(torch.stack(within).mean()) if within else None
    return record


# ================================================================ the command

def validate(cfg: EvalConfig) -> None:
    if cfg.app is not None and cfg.app not in APPS:
        raise DiffcliError(f"unknown --app {cfg.app!r}; choose {' or '.join(APPS)}")
    if cfg.anagram_prompts and cfg.app == "wide_images":
        raise DiffcliError("--anagram-metrics scores ambiguous images; it cannot go with --app wide_images")
    if not (cfg.app or cfg.anagram_prompts or cfg.fid or cfg.kid or cfg.digits):
        raise DiffcliError("nothing to evaluate: pass --app wide_images|ambiguous_images, --fid REF, --kid REF "
                           "or --digits")
    if cfg.features not in FEATURES:
        raise DiffcliError(f"unknown --features {cfg.features!r}; choose {' or '.join(FEATURES)}")
    if cfg.batch_size < 1:
        raise DiffcliError("--batch-size must be >= 1")
    if cfg.kid_subsets < 1 or cfg.kid_subset_size < 2:
        raise DiffcliError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")


def merge_eval(folder: str, clip_part: dict[str, Any] | None, families: dict[str, Any]) -> dict[str, Any]:
    """A CLIP run rewrites the grader's part of eval.json; fid/kid/digits replace only their own keys."""
    old: dict[str, Any] = {}
    try:
        loaded = json.loads((Path(folder) / EVAL_FILE).read_text())
        old = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    if clip_part is None:
        clip_part = {k: v for k, v in old.items() if k not in OTHER_FAMILIES}
    rest = {k: families.get(k, old.get(k)) for k in OTHER_FAMILIES if k in families or k in old}
    return {**clip_part, **rest}


def grade(score: float) -> str:
    return next((f"003 grade: {name} (>= {t})" for t, name in GRADES if score >= t), "003 grade: none (< 0.26)")


def batch_share(dist: Dist, items: Sequence[T], batch_size: int) -> list[T]:
    """This rank's whole batches of items (every world-th one): each batch holds the images one process batches
    together, so every image's features come out bitwise the same as with one process."""
    if dist.world == 1:
        return list(items)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [x for batch in dist.shard(batches) for x in batch]


def _rows(x: Rows, rows: slice) -> Rows:
    return tuple(_rows(t, rows) for t in x) if isinstance(x, tuple) else x[rows]


def _cat(parts: list[Rows]) -> Rows:
    if isinstance(parts[0], tuple):
        return tuple(_cat(list(p)) for p in zip(*parts))
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def per_image(dist: Dist, mine: Sequence[T], batch_size: int, compute: Callable[[Sequence[T]], Rows]) -> Rows | None:
    """compute(mine) -> one row per item of this rank's `batch_share`; every rank's rows in item order on rank 0
    (None on the others)."""
    if dist.world == 1:
        return compute(mine)
    rows = compute(mine) if mine else None
    parts = dist.gather([_rows(rows, slice(i, i + batch_size)) for i in range(0, len(mine), batch_size)])
    return None if parts is None else _cat(parts)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Read and check every input, compute what was asked, write eval.json; returns lines and warnings to print.

    Under torchrun every rank reads the inputs, decodes its share of the images and computes the per-image values
    (CLIP image embeddings, FID/KID features, digit logits) for its share of whole batches; rank 0 gathers them in
    item order, computes every aggregate and writes eval.json, so the file is the one a single process writes.
    """
    validate(cfg)
    if cfg.anagram_prompts and cfg.app is None:
        cfg.app = "ambiguous_images"
    with Dist(cfg.device) as dist:
        return _run(cfg, dist)


def _run(cfg: EvalConfig, dist: Dist) -> dict[str, Any]:
    device, bs = dist.device, cfg.batch_size
    notes: list[str] = []

    # ---- read everything first, so bad input fails before any model loads
    clip_files = pairs = None
    if cfg.app:
        clip_files, n = plan_clip_files(cfg.folder, cfg.app, cfg.drop_panoramas)
        notes += n + conversion_warnings(check_images([f.path for f in clip_files], dist))
        if cfg.anagram_prompts:
            pairs = read_anagram_pairs(cfg.anagram_prompts)
    refs: dict[str, Reference] = {}
    for option, spec in (("--fid", cfg.fid), ("--kid", cfg.kid)):
        if spec:
            refs[option] = parse_reference(spec, option)
            if refs[option].dataset and cfg.features != "inception":
                raise DiffcliError(f"{option} {spec}: clean-fid's dataset statistics are Inception features; "
                                   f"pass a reference folder with --features {cfg.features}")
    gen_files: list[str] = []
    ref_files: dict[str, list[str]] = {}
    if refs:
        gen_files, n = feature_files(cfg.folder, "folder", dist)
        notes += n
        for r in refs.values():
            if r.folder and r.folder not in ref_files:
                ref_files[r.folder], n = feature_files(r.folder, "reference folder", dist)
                notes += n
    digit_labels = None
    if cfg.digits:
        digit_files, digit_labels, n = read_digit_samples(cfg.folder)
        notes += n
        digit_arrays = read_each(dist, digit_files, read_digit, batch_share(dist, digit_files, bs))

    # ---- per-image work: this rank's share, gathered on rank 0 in item order
    clip = image_emb = None
    if clip_files:
        clip = load_clip(cfg.clip_model, cfg.clip_pretrained, device, cfg.quick_gelu)

        def embed(paths: Sequence[str]) -> torch.Tensor:
            with progress_bar("CLIP", len(paths), disable=not dist.main) as advance:
                return embed_image_files(clip, paths, bs, on_batch=advance)
        image_emb = per_image(dist, batch_share(dist, [f.path for f in clip_files], bs), bs, embed)
    feats: dict[str, np.ndarray] = {}
    if refs:
        from cleanfid.resize import make_resizer
        if cfg.features == "mnist":
            from .classifier import SHIPPED_CLASSIFIER, load_classifier
            classifier = load_classifier(cfg.classifier or SHIPPED_CLASSIFIER, device)
            # clean-fid's clean resize (PIL bicubic on float channels) at the classifier's 28x28, not Inception's 299
            extractor, resize = digit_feature_fn(classifier), make_resizer("PIL", False, "bicubic", (28, 28))
        else:
            extractor, resize = inception_extractor(device), None
        for p, f in [("", gen_files), *ref_files.items()]:
            feats[p] = per_image(dist, batch_share(dist, f, bs), bs,
                                 lambda share: folder_features(share, extractor, resize, bs, device, dist.main))
    digit_out = None
    if cfg.digits:
        from .classifier import SHIPPED_CLASSIFIER, load_classifier
        classifier_path = cfg.classifier or SHIPPED_CLASSIFIER
        digit_classifier = load_classifier(classifier_path, device)
        digit_out = per_image(dist, digit_arrays, bs,
                              lambda arrays: classify(digit_classifier, stack_digits(arrays), bs, device))

    # ---- every aggregate on rank 0, from the per-image values in item order; then eval.json
    def aggregate() -> dict[str, Any]:
        lines: list[str] = []
        clip_part = None
        if clip_files:
            clip_part = clip_metrics(cfg, clip, clip_files, image_emb, pairs, lines, notes)
        families: dict[str, Any] = {}
        if refs:
            families.update(fid_kid(cfg, refs, feats, len(gen_files), lines))
        if cfg.digits:
            rec = digit_record(*digit_out, digit_labels)
            families["digits"] = {**rec, "classifier": str(classifier_path)}
            acc = f"accuracy {100 * rec['accuracy']:.2f} %, " if "accuracy" in rec else ""
            sim = f"{rec['mean_similarity']:.4f}" if rec["mean_similarity"] is not None else "n/a"
            lines.append(f"digits: {acc}{rec['modes_discovered']} modes discovered, mean in-batch similarity {sim} "
                         f"({rec['n']} samples)")
        out = Path(cfg.folder) / EVAL_FILE
        write_json(out, merge_eval(cfg.folder, clip_part, families), indent=4)
        return {"eval_file": str(out), "lines": lines, "warnings": notes, "eval": json.loads(out.read_text())}

    result = dist.main_first(aggregate, failure="rank 0 could not compute the scores (see its message)")
    return {**(result or {}), "main": dist.main}


def clip_metrics(cfg: EvalConfig, clip: Clip, clip_files: Sequence[ClipFile], image_emb: torch.Tensor,
                 pairs: dict[str, tuple[str, str]] | None, lines: list[str], notes: list[str]) -> dict[str, Any]:
    """The grader's part of eval.json (+ anagram metrics) from the image embeddings in file order."""
    prompts, first_paths, prompt_index = group_prompts(clip_files)
    text_emb = embed_prompts(clip, prompts, cfg.batch_size)
    means = group_means(cosine_per_image(image_emb, text_emb, prompt_index), prompt_index, len(prompts))
    clip_part = clip_score_record(cfg.folder, first_paths, means)
    lines.append(f"CLIP score {clip_part['score']:.4f} ({cfg.app}: {len(prompts)} prompts, {len(clip_files)} "
                 f"images; {clip.weights}{', QuickGELU' if clip.quick_gelu else ''}); {grade(clip_part['score'])}")
    if pairs is not None:
        scale = float(clip.model.logit_scale.exp().reshape(-1)[0])
        clip_part["anagram_metrics"], n = anagram_record(pairs, prompts, first_paths, image_emb, prompt_index,
                                                         text_emb, scale, cfg.anagram_prompts)
        notes += n
        am = clip_part["anagram_metrics"]
        lines.append(f"anagram alignment {am['alignment']:.4f}, concealment {am['concealment']:.4f} "
                     f"over {len(am['pairs'])} pair(s)")
    return clip_part


def fid_kid(cfg: EvalConfig, refs: dict[str, Reference], feats: dict[str, np.ndarray], n_images: int,
            lines: list[str]) -> dict[str, Any]:
    """eval.json's fid and kid families from the folder's features (key "") and each reference folder's."""
    families: dict[str, Any] = {}
    common = {"features": cfg.features, "mode": "clean", "n_images": n_images}
    if "--fid" in refs:
        r = refs["--fid"]
        if r.folder:
            ref = feats[r.folder]
            mu, sigma, n_ref = ref.mean(0), np.cov(ref, rowvar=False), len(ref)
        else:
            mu, sigma = reference_statistics(r, "FID")
            n_ref = None
        try:
            value = frechet_distance(feats[""], mu, sigma)
        except ValueError as e:
            raise DiffcliError(f"FID is numerically undefined here ({e}); use more images") from None
        families["fid"] = {"value": value, "reference": r.spec, **common, "n_reference": n_ref}
        lines.append(f"FID {value:.4f} ({cfg.features} features, {n_images} images vs {r.spec})")
    if "--kid" in refs:
        r = refs["--kid"]
        ref = feats[r.folder] if r.folder else reference_statistics(r, "KID")
        m = min(len(ref), len(feats[""]), cfg.kid_subset_size)
        value = kernel_distance(feats[""], ref, cfg.kid_subsets, cfg.kid_subset_size)
        families["kid"] = {"value": value, "reference": r.spec, **common, "n_reference": len(ref),
                           "subsets": cfg.kid_subsets, "subset_size": m}
        lines.append(f"KID {value:.6f} ({cfg.features} features, {cfg.kid_subsets} subsets of {m})")
    return families
