"""Checks on an input file made before anything of it is stored: a gzip that ends early, binary data."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from payscope.errors import InputError

SNIFF = 8192


def check_gzip(path: Path) -> None:
    """Refuse a gzip file that does not decompress to its end."""
    with path.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise InputError(f"{path}: corrupt or truncated gzip ({exc}); nothing of it was stored") from None


BINARY_SHARE = 0.05  # of the first bytes NUL or control characters: binary data (a stray bad line is not)
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f\b\x1b") + b"\x7f"


def check_text(path: Path) -> None:
    """Refuse a file whose first bytes (decompressed) are binary data, not lines of text."""
    check_gzip(path)
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else path.open("rb")) as stream:
        head = stream.read(SNIFF)
    if head and len(head) - len(head.translate(None, _CONTROL)) > BINARY_SHARE * len(head):
        raise InputError(f"{path}: binary data, not a log file; nothing of it was stored")
