"""Features for FID/KID through clean-fid, so the numbers are clean-fid's: the reference (a folder, or a dataset
clean-fid has statistics for), the files it reads from a folder, its feature extractors (Inception, or the digit
classifier's penultimate layer) and its reader (PIL, clean resize). The distances themselves are `metrics`'.

clean-fid is imported where it is used: it takes seconds to load (scipy, its Inception code), and only FID/KID
need it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..shared.errors import DiffcliError
from ..shared.files import check_folder, some_names
from ..shared.inputs import input_path
from ..shared.libraries import quiet_libraries, reachable
from ..shared.dist import Dist
from .image_folders import SAMPLE_ARTIFACTS, check_images, is_regular, is_sample_folder, recorded_samples

FEATURES = ("inception", "mnist")
# clean-fid's precomputed Inception statistics: name -> (default resolution, default split)
DATASET_STATS = {"cifar10": (32, "train"), "ffhq": (1024, "trainval70k"), "lsun_church": (256, "train"),
                 "afhq_cat": (512, "train"), "afhq_dog": (512, "train"), "afhq_wild": (512, "train"),
                 "metfaces": (1024, "train")}
Extractor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Reference:
    spec: str
    folder: str | None = None
    dataset: tuple[str, int, str] | None = None    # (name, resolution, split) of clean-fid's statistics


def parse_reference(spec: str, option: str = "reference") -> Reference:
    """A reference folder, or NAME[:RES[:SPLIT]] of a dataset clean-fid has precomputed statistics for.
    `option` names the setting in messages (e.g. fid or kid)."""
    path = Path(spec)
    if os.path.lexists(spec) and not path.is_file():  # a folder, or a loop, dangling link, device: one line
        input_path(spec, f"{option} reference folder", "folder")
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


def cleanfid_listing(folder: str, notes: list[str] | None = None) -> list[str]:
    """The image files clean-fid's get_folder_features reads in a folder (recursive, its extensions, hidden names
    skipped and the paths sorted, as its glob gives them), listed by us so that nothing is counted twice or hangs:
    a folder reached through a symlink is not entered (clean-fid's recursive glob follows it, and a symlink loop
    makes it count the same images over and over, a silently wrong FID), and entries that are not regular files
    (FIFOs, which would hang its reader, sockets, devices, broken links) are left out. What is left out is
    named in `notes`."""
    from cleanfid.utils import EXTENSIONS
    suffixes = tuple(f".{ext}" for ext in EXTENSIONS)
    files, linked, special = [], [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for d in list(dirs):
            if d.startswith("."):
                dirs.remove(d)
            elif os.path.islink(os.path.join(root, d)):  # os.walk lists it, and does not enter it
                linked.append(os.path.join(root, d))
        for name in names:
            path = os.path.join(root, name)
            if name.startswith(".") or not name.endswith(suffixes):
                continue
            (files if is_regular(path) else special).append(path)
    if notes is not None:
        if linked:
            notes.append(f"did not enter {len(linked)} symlinked folder(s) under {folder} (clean-fid's own listing "
                         f"follows them, a loop counting images again and again): {some_names(linked)}")
        if special:
            notes.append(f"left out {len(special)} image name(s) under {folder} that are not regular files (FIFOs, "
                         f"devices, broken links; clean-fid would hang or crash on them): {some_names(special)}")
    return sorted(files)


def feature_files(folder: str, what: str, dist: Dist | None = None) -> tuple[list[str], list[str]]:
    """clean-fid's file list for a folder, minus the grid/strip `diffcli sample` writes beside its samples."""
    notes: list[str] = []
    files = cleanfid_listing(str(check_folder(folder, what)), notes)
    listed = recorded_samples(folder)
    if listed is not None:  # the run record says which images are samples; figures beside them are not
        keep = {os.path.normpath(os.path.join(folder, f)) for f in listed}
        extra = [f for f in files if os.path.normpath(f) not in keep]
    elif is_sample_folder(folder):
        extra = [f for f in files if Path(f).parent == Path(folder) and Path(f).name in SAMPLE_ARTIFACTS]
    else:
        extra = []
    if extra:
        files = [f for f in files if f not in extra]
        notes.append(f"left {some_names([os.path.relpath(f, folder) for f in extra])} out of the {what} images "
                     "(not samples in the folder's run.json)")
    if len(files) < 2:
        raise DiffcliError(f"{what} {folder} has {len(files)} image(s); FID/KID need at least 2")
    check_images([f for f in files if not f.endswith(".npy")], dist)
    return files, notes


def digit_feature_fn(classifier: torch.nn.Module) -> Extractor:
    """clean-fid hands extractors (N,3,H,W) floats in [0, 255]; the digit classifier reads grey [-1, 1]."""
    def features(batch: torch.Tensor) -> torch.Tensor:
        return classifier.features(batch.mean(1, keepdim=True) / 127.5 - 1)
    return features


def inception_extractor(device: torch.device) -> Extractor:
    from cleanfid.downloads_helper import inception_url
    from cleanfid.features import build_feature_extractor
    local = Path("/tmp/inception-2015-12-05.pt")  # where clean-fid keeps it
    if not local.is_file() and not reachable(inception_url):
        raise DiffcliError(f"clean-fid's Inception weights are not in {local} and cannot be downloaded here "
                           f"(offline): copy {inception_url} there, or score digits with the mnist features")
    try:
        with quiet_libraries():
            return build_feature_extractor("clean", device, use_dataparallel=False)
    except Exception as e:
        raise DiffcliError(f"could not load clean-fid's Inception network: {str(e).splitlines()[0]}") from None


def feature_extractor(features: str, device: torch.device,
                      classifier: torch.nn.Module | None = None) -> tuple[Extractor, Callable | None]:
    """(extractor, resize) for clean-fid's reader: `features` inception (its own resize to 299), or mnist (the
    digit `classifier`'s features after clean-fid's clean resize, PIL bicubic on float channels, to 28x28)."""
    if features not in FEATURES:
        raise DiffcliError(f"unknown features {features!r}; choose {' or '.join(FEATURES)}")
    if features == "inception":
        return inception_extractor(device), None
    if classifier is None:
        raise DiffcliError("features 'mnist' need the digit classifier")
    from cleanfid.resize import make_resizer
    return digit_feature_fn(classifier), make_resizer("PIL", False, "bicubic", (28, 28))


def folder_features(files: Sequence[str], extractor: Extractor, resize: Callable | None, batch_size: int,
                    device: torch.device, verbose: bool = True) -> np.ndarray:
    """Features through clean-fid's own reader (PIL convert('RGB'), clean resize) with mode='clean'."""
    from cleanfid.fid import get_files_features
    return get_files_features(list(files), extractor, num_workers=0, batch_size=batch_size, device=device,
                              mode="clean", custom_fn_resize=resize, verbose=verbose and sys.stderr.isatty())


def reference_statistics(ref: Reference, metric: str):
    """clean-fid's precomputed statistics of a dataset reference: (mu, sigma) for FID, features for KID."""
    from cleanfid.features import get_reference_statistics
    name, res, split = ref.dataset
    try:
        with quiet_libraries():
            return get_reference_statistics(name, res, mode="clean", split=split, metric=metric)
    except Exception as e:
        raise DiffcliError(f"clean-fid's {metric} statistics for {name} {res} {split} are not cached and could not "
                           f"be downloaded ({str(e).splitlines()[0]}); pass a reference folder instead") from None
