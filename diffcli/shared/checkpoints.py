"""Checkpoints (safetensors only)."""
from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DiffcliError
from .inputs import input_path, parse_json
from .files import atomic_path


PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Nested dicts/lists of tensors and plain values -> (flat tensors, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return tensors, {"__tensor__": prefix}
    if isinstance(obj, dict):
        skel = {}
        for k, v in obj.items():
            t, s = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
            skel[str(k)] = s
        return tensors, {"__dict__": skel, "__intkeys__": all(isinstance(k, int) for k in obj) and bool(obj)}
    if isinstance(obj, (list, tuple)):
        skel_list = []
        for i, v in enumerate(obj):
            t, s = flatten_state(v, f"{prefix}.{i}")
            tensors.update(t)
            skel_list.append(s)
        return tensors, {"__list__": skel_list, "__tuple__": isinstance(obj, tuple)}
    return tensors, {"__value__": obj}


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if "__dict__" in skel:
        conv = int if skel.get("__intkeys__") else str
        return {conv(k): unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
    if "__list__" in skel:
        items = [unflatten_state(v, tensors) for v in skel["__list__"]]
        return tuple(items) if skel.get("__tuple__") else items
    return skel["__value__"]


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + a JSON metadata record as one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"diffcli": json.dumps(meta)})
        except Exception as e:  # safetensors' own error type for a failed write (a full disk): an OSError again
            if isinstance(e, OSError):
                raise
            found = re.search(r"os error (\d+)", str(e))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(tmp)) from e


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a diffcli safetensors file; refuse pickles and say clearly what is wrong with a bad file."""
    path = input_path(path, "checkpoint", "file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: a u64 header length, then the JSON header; its first byte is 0x80 for 1 length in 256, so only
    # a file without that JSON brace counts as a pickle
    if head.startswith(PICKLE_MAGIC) and head[8:9] != b"{":
        raise DiffcliError(f"{path} is a pickle/torch.save file; diffcli never unpickles weights (convert it to safetensors)")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta_text = (f.metadata() or {}).get("diffcli")
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise DiffcliError(f"{path} is not a readable safetensors file (truncated or corrupt?): {str(e).splitlines()[0]}") from e
    if meta_text is None:
        raise DiffcliError(f"{path} is a safetensors file but not a diffcli checkpoint (no 'diffcli' metadata)")
    meta = parse_json(meta_text, f"{path}: its 'diffcli' metadata")
    if not isinstance(meta, dict):
        raise DiffcliError(f"{path}: its 'diffcli' metadata is a JSON {type(meta).__name__}, not an object")
    return tensors, meta


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def add_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}
