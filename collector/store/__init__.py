"""Where spans and logs live: the storage interface and its backends."""

from __future__ import annotations

import os
from pathlib import Path

from payscope.errors import StoreError

from .api import SAMPLE_DIGITS, LogQuery, Sample, Store, UnavailableError, UnsupportedError, group_traces

DEFAULT_STORE = "payscope.db"

__all__ = ["DEFAULT_STORE", "SAMPLE_DIGITS", "LogQuery", "Sample", "Store", "UnavailableError", "UnsupportedError",
           "group_traces", "open_store", "resolve_store_url"]


def resolve_store_url(url: str | None) -> str:
    """The store to use: the argument, else ``PAYSCOPE_STORE``, else ``./payscope.db``."""
    return url or os.environ.get("PAYSCOPE_STORE") or DEFAULT_STORE


def open_store(url: str | None = None, *, readonly: bool = False, spool: Path | None = None) -> Store:
    """Open the store named by ``url``: a file path, or ``es://host:port`` / ``https://host:port`` for
    Elasticsearch (``?traces=INDEX&logs=INDEX`` reads another pipeline's indices). ``spool``: where a
    collector keeps acknowledged batches while Elasticsearch cannot take them (the embedded store needs none)."""
    url = resolve_store_url(url)
    if url.startswith(("es://", "http://", "https://")):
        from .elastic import ElasticStore

        return ElasticStore(url, readonly=readonly, spool=spool)
    from .embedded import EmbeddedStore

    path = Path(url)
    if path.is_dir():
        raise StoreError(f"--store {url} is a directory; give a file path such as {path / DEFAULT_STORE}")
    return EmbeddedStore(path, readonly=readonly)
