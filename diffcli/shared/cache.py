"""Loads shared by several runs in one process (a sweep): within `caching()`, `cached(key, make)` makes each
model, pipeline or prompt encoding once; outside it, `cached` simply calls `make`."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Iterator

_cache: dict[Hashable, Any] | None = None


@contextlib.contextmanager
def caching() -> Iterator[None]:
    global _cache
    outer, _cache = _cache, ({} if _cache is None else _cache)
    try:
        yield
    finally:
        _cache = outer


def cached(key: Hashable, make: Callable[[], Any]) -> Any:
    if _cache is None:
        return make()
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]
