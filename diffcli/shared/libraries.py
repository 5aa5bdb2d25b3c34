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


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test, so that an offline machine gets our message now, not after minutes of retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
