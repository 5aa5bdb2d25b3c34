"""Third-party libraries and downloads."""
from __future__ import annotations

import contextlib
import io
import logging
import socket
import warnings
from typing import Iterator
from urllib.parse import urlparse



@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """open_clip/huggingface/clean-fid log warnings and progress bars we restate ourselves (or that do not apply)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def library_warnings(show: bool = False, keep: bool = False) -> Iterator[list[warnings.WarningMessage]]:
    """Python warnings raised inside the block (by torch, diffusers, scipy, clean-fid, ...) never reach the user
    as they are: with `keep` they are collected in the yielded list, for a caller that knows what one means to turn
    it into a one-line diffcli note (FID's singular covariance); otherwise silenced. `show` (--debug) lets them
    print as Python would."""
    if show:
        yield []
        return
    with warnings.catch_warnings(record=keep) as caught:
        warnings.simplefilter("always" if keep else "ignore")
        yield caught if caught is not None else []


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test, so that an offline machine gets our message now, not after minutes of retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
