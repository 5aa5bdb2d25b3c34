"""Datasets as in-memory uint8 tensors (N, C, H, W) plus labels: small enough for the models we train,
and it makes the data order a pure function of (seed, epoch), which is what exact resume needs."""
from __future__ import annotations

import contextlib
import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..shared.images import IMAGE_EXTS, check_image_file
from ..shared.errors import DiffcliError
from ..shared.memory import check_memory
from ..shared.inputs import input_path
from ..shared.limits import PIXELS_MAX
from .sequences import KINDS as SEQUENCE_KINDS, SequenceSpec, check_spec, digit_tiles, make_dataset

DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder:PATH", *SEQUENCE_KINDS)

_IDX = {  # name -> (torchvision folder, class names)
    "mnist": ("MNIST", [str(i) for i in range(10)]),
    "fashion-mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}


@dataclass
class ImageSet:
    images: torch.Tensor          # uint8 (N, C, H, W)
    labels: torch.Tensor | None   # long (N,) or None
    class_names: list[str]
    name: str
    context: torch.Tensor | None = None   # uint8 (N, C_ctx, H, W): the frames before `images` (sequence sets)
    sequence: dict | None = None          # the generator's parameters (sequence sets), recorded in checkpoints
    digits: torch.Tensor | None = None    # uint8 (N, s, s): the digit tile of each sequence (sequence sets)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0


def read_idx(path: Path) -> np.ndarray:
    """IDX file (optionally .gz) -> numpy array; images are magic 2051, labels 2049."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DiffcliError(f"{path} is not an IDX uint8 file (magic {magic})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DiffcliError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for d in (root, root / folder / "raw", root / folder):
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _load_idx_dataset(name: str, root: Path, split: str) -> ImageSet:
    folder, classes = _IDX[name]
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, folder, s) for s in stems]
    if None in paths:
        _try_download(name, root, split)
        paths = [_find_idx(root, folder, s) for s in stems]
    if None in paths:
        raise DiffcliError(f"{name} {split} files not found under {root} and could not be downloaded; put "
                           f"{stems[0]}.gz and {stems[1]}.gz in {root / folder / 'raw'} (or give another root)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if len(images) != len(labels):
        raise DiffcliError(f"{name}: {len(images)} images but {len(labels)} labels")
    return ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), classes, name)


def _try_download(name: str, root: Path, split: str) -> None:
    """torchvision download where a network exists; silent failure (the caller explains what to do)."""
    try:
        # deferred here and in _load_cifar10: torchvision.datasets takes seconds to import, and only downloads
        # and CIFAR-10 need it
        import torchvision.datasets as tvd
        cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cls(str(root), train=(split == "train"), download=True)
    except Exception:
        pass


def _load_cifar10(root: Path, split: str) -> ImageSet:
    import torchvision.datasets as tvd
    try:
        ds = tvd.CIFAR10(str(root), train=(split == "train"), download=False)
    except RuntimeError:
        _try_download("cifar10", root, split)
        try:
            ds = tvd.CIFAR10(str(root), train=(split == "train"), download=False)
        except RuntimeError:
            raise DiffcliError(f"cifar10 not found under {root} and could not be downloaded; extract "
                               f"cifar-10-python.tar.gz there (giving {root / 'cifar-10-batches-py'}) or give another root") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes), "cifar10")


def _load_folder(path: Path, image_size: int | None, channels: int | None) -> ImageSet:
    """Images in PATH, or in PATH/<class>/ subfolders (then labelled by subfolder)."""
    input_path(path, "--dataset image folder", "folder")
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups = [(d.name, _image_files(d.rglob("*"))) for d in subdirs]
    groups = [(n, fs) for n, fs in groups if fs]
    labelled = bool(groups)
    if not labelled:
        groups = [("", _image_files(path.iterdir()))]
    if not any(fs for _, fs in groups):
        raise DiffcliError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) in {path}")
    if channels not in (None, 1, 3):
        raise DiffcliError(f"channels must be 1 or 3 (grey or RGB), got {channels!r}")
    mode = {1: "L", 3: "RGB", None: None}[channels]
    # every header first (decompression bombs refused before any pixel is decoded), then what the set will take
    sizes = [check_image_file(f, PIXELS_MAX) for _, files in groups for f in files]
    c = channels or 3
    need = sum(c * (image_size * image_size if image_size else w * h) for w, h in sizes)
    resized = f" at {image_size} x {image_size}" if image_size else ""
    check_memory(need, "cpu", f"the {len(sizes)} images of {path}{resized}", "pass a smaller --image-size")
    arrays, labels = [], []
    for label, (_, files) in enumerate(groups):
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    if mode is None:
                        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    im = im.convert(mode)
                    if image_size:
                        im = _center_square(im).resize((image_size, image_size), Image.BICUBIC)
                    arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, -1))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                raise DiffcliError(f"cannot read image {f}: {e}") from e
            labels.append(label)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DiffcliError(f"images in {path} have different sizes {sorted(shapes)[:3]}...; pass image_size to resize")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    names = [n for n, _ in groups] if labelled else []
    return ImageSet(images, torch.tensor(labels) if labelled else None, names, f"folder:{path}")


def _image_files(paths) -> list[Path]:
    """The image files among `paths`, sorted (folders skipped). An entry with an image suffix that is no regular file
    (a FIFO, socket or device: opening it could block forever) is refused before any file is opened."""
    files = []
    for p in paths:
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            mode = p.stat().st_mode  # follows links: a link to an image is an image
        except OSError as e:  # a dangling link
            raise DiffcliError(f"cannot read image {p}: {e.strerror or e}") from None
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise DiffcliError(f"{p} is not a regular file (a FIFO, socket or device); a dataset folder holds plain "
                               "image files: remove it")
        files.append(p)
    return sorted(files)


def _center_square(im):
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def load_dataset(spec: str, root: str | Path = "data", split: str = "train",
                 image_size: int | None = None, channels: int | None = None,
                 sequence: dict | None = None) -> ImageSet:
    """`mnist`, `fashion-mnist`, `cifar10` (torchvision layout under root), `folder:PATH`, or a sequence set
    built from MNIST digits (`moving-mnist`, `circle-jumping`, `horizontal`; options in `sequence`)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DiffcliError(f"unknown split {split!r} (train or test)")
    if spec in SEQUENCE_KINDS:
        return _load_sequences(spec, root, split, image_size, channels, sequence or {})
    if sequence:
        raise DiffcliError(f"sequence option {next(iter(sequence))!r} is for the sequence datasets "
                           f"({', '.join(SEQUENCE_KINDS)}), not {spec}")
    if spec.startswith("folder:"):
        return _load_folder(Path(spec[len("folder:"):]), image_size, channels)
    if spec in _IDX:
        ds = _load_idx_dataset(spec, root, split)
    elif spec == "cifar10":
        ds = _load_cifar10(root, split)
    else:
        raise DiffcliError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
    if image_size and image_size != ds.images.shape[-1]:
        n, c, h, w = ds.images.shape  # resized in float: the set before and after, 4 bytes a value
        check_memory(n * c * (h * w + image_size * image_size) * 4, "cpu",
                     f"{spec} resized to {image_size} x {image_size} ({n} images)", "pass a smaller --image-size")
        ds.images = torch.nn.functional.interpolate(ds.images.float(), size=(image_size, image_size),
                                                    mode="bilinear", antialias=True, align_corners=False
                                                    ).round().clamp(0, 255).to(torch.uint8)
    return ds


_SEQUENCE_OPTIONS = {"moving-mnist": {"context_frames", "step_size", "seed", "p_change", "num_digits"},
                     "circle-jumping": {"context_frames", "step_size", "directions", "seed"},
                     "horizontal": {"context_frames", "step_size", "p_left", "seed"}}


def _load_sequences(kind: str, root: Path, split: str, frame_size: int | None, channels: int | None,
                    options: dict) -> ImageSet:
    """Sequences generated from the MNIST digits under root: images = next frames, context = the frames before."""
    spec = SequenceSpec(kind, frame_size=frame_size or 32, **options)
    check_spec(spec)  # range errors first, then options that do not apply
    extra = sorted(set(options) - _SEQUENCE_OPTIONS[kind])
    if extra:
        raise DiffcliError(f"sequence option {extra[0]!r} does not apply to {kind}")
    if channels not in (None, 1):
        raise DiffcliError(f"{kind} frames are grey (1 channel), not {channels} channels")
    raw = _load_idx_dataset("mnist", Path(root), split).images  # 28-px digits: small; their count sizes the rest
    check_memory(len(raw) * (spec.context_frames + 1) * spec.frame_size ** 2 + tiles_bytes(len(raw), spec.digit_size),
                 "cpu", f"{len(raw)} {kind} sequences of {spec.context_frames + 1} {spec.frame_size}-px frames",
                 "pass a smaller --image-size")
    tiles = digit_tiles(raw, spec.digit_size)
    context, nxt = make_dataset(spec, tiles)
    record = {**spec.record(), "split": split, "data_root": str(root.resolve()), "sequences": len(nxt)}
    return ImageSet(nxt, None, [], kind, context, record, tiles)


def mnist_digit_tiles(root: str | Path, split: str, size: int) -> torch.Tensor:
    """The MNIST digits under root (torchvision layout) as the sequence sets' (N, size, size) digit tiles; their
    memory (the resize works in floats) is checked before any is made."""
    raw = _load_idx_dataset("mnist", Path(root), split).images
    check_memory(tiles_bytes(len(raw), size), "cpu", f"{len(raw)} digit tiles of {size} px",
                 "pass a smaller --image-size")
    return digit_tiles(raw, size)


def tiles_bytes(n: int, size: int) -> int:
    """What `digit_tiles` allocates for n digits of `size` px: the float resize (4 bytes a pixel) and the result."""
    return n * size * size * 5


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class BatchOrder:
    """Global indices of the images in step `step`'s batch (epochs of fresh permutations, no drop)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        g = torch.arange(step * self.batch, (step + 1) * self.batch)
        epochs, pos = g // self.n, g % self.n
        return torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, pos)])
