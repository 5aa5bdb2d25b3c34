"""Names from prompts."""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import DiffcliError
from .files import TEMP_NAME_BYTES
from .inputs import read_stream, shown


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


NAME_MAX_BYTES = 255  # a file name's limit in bytes (Linux NAME_MAX; macOS and Windows allow 255 characters)
# a stem from user text, in UTF-8 bytes: leaves room for `-<k>` (unique_stems), the suffixes commands add
# (`_<pos>.png`, `_seed<k>.png`, `_strip.png`) and atomic_path's temp name (TEMP_NAME_BYTES) within NAME_MAX_BYTES
STEM_MAX_BYTES = 160


def _cap_bytes(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` in UTF-8, at a character boundary."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def safe_name(prompt: str, max_len: int = 120, max_bytes: int = STEM_MAX_BYTES) -> str:
    """A file-name stem from a prompt that can never leave its folder: the 003 layout (spaces -> `_`).

    Keeps letters, digits and `-_.,'()`; drops separators, control characters and anything else; no
    leading dots, no Windows-reserved names, at most `max_len` characters and `max_bytes` UTF-8 bytes (multi-byte
    scripts reach the file system's 255-byte limit long before 120 characters), so suffixes and temp names fit.
    """
    chars = [c if (c.isalnum() or c in "-_.,'()") else ("_" if c.isspace() or c in "/\\" else "") for c in prompt]
    stem = re.sub(r"_+", "_", "".join(chars)).strip("._ ")
    stem = _cap_bytes(stem[:max_len], max_bytes).rstrip("._ ")
    if not stem or stem.lower().split(".")[0] in _RESERVED:
        stem = _cap_bytes("prompt_" + stem, max_bytes).rstrip("._ ") if stem else "prompt"
    return stem


def _same_file_key(name: str) -> str:
    """Names a case-insensitive, normalising file system (macOS, Windows) takes for the same file compare equal."""
    return unicodedata.normalize("NFC", name).casefold()


def unique_stems(texts: Sequence[str], files: Callable[[int, str], Iterable[str]] | None = None,
                 max_len: int = 120) -> list[str]:
    """THE rule for file names from user text (seg, panorama, anagram): item i's stem is `safe_name(texts[i])`;
    where any file it names (`files(i, stem)`, default just the stem) is one an earlier item already names, the
    first of `stem-2`, `stem-3`, ... whose files are all free. So 'a cat' and 'a/cat' give `a_cat` and `a_cat-2`
    and nothing is overwritten; names compare as on a case-insensitive file system ('A cat' vs 'a cat')."""
    files = files or (lambda i, stem: [stem])
    claimed: set[str] = set()
    # per base: every suffix below it has its first file (the stem's own: `stem`, `stem.png`, `stem.gif`, the same
    # for every item) taken, so no later item can have it; n copies of one prompt name in O(n), not O(n^2)
    first_free: dict[str, int] = {}
    named = lambda base, k: base if k == 1 else f"{base}-{k}"  # noqa: E731
    stems, bases = [], {}  # bases: text -> (its stem, its key), each text cleaned once
    for i, text in enumerate(texts):
        if text not in bases:
            bases[text] = (safe_name(text, max_len), _same_file_key(safe_name(text, max_len)))
        base, key = bases[text]
        start = k = first_free.get(key, 1)
        while any(_same_file_key(f) in claimed for f in files(i, named(base, k))):
            k += 1
        claimed.update(_same_file_key(f) for f in files(i, named(base, k)))
        while _same_file_key(next(iter(files(i, named(base, start))))) in claimed:
            start += 1
        first_free[key] = start
        stems.append(named(base, k))
    return stems


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that `folder`'s file system takes (its nearest existing ancestor's)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(os.pathconf(path, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return NAME_MAX_BYTES


def check_file_names(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Before any work: every file a command will write in `folder` (relative names; each part counts) fits the
    file system's name limit together with atomic_path's temp name; else one line naming the file."""
    limit = name_max(folder)
    for name in names:
        for part in Path(name).parts:
            size = len(os.fsencode(part))
            if size + TEMP_NAME_BYTES > limit:
                raise DiffcliError(f"file name {part[:48]!r}... is {size} bytes; with the {TEMP_NAME_BYTES}-byte temp "
                                   f"name it is written under first, that exceeds the {limit}-byte name limit of the "
                                   f"file system of {folder}; shorten the prompt (or --seed) or choose another --out")


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt a line; blank lines and `#` comments skipped (for shell scripts looping over prompt sets). A file,
    a pipe (`<(printf ...)`) or `-` (standard input), read once and bounded in size (`inputs.read_stream`)."""
    text = read_stream(path, "prompts file")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DiffcliError(f"prompts file {shown(os.fspath(path))} has no prompts (one a line)")
    return prompts
