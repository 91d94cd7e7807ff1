"""Checks on input made before anything of it is stored: a gzip that ends early, binary data, text that
UTF-8 cannot hold."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

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


def fix_surrogates(value: Any) -> Any:
    """``value`` (a JSON document) with lone UTF-16 surrogates (``"\\ud800"``) replaced by U+FFFD and escaped
    pairs joined, so that every string in it can be stored as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [fix_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {fix_surrogates(k): fix_surrogates(v) for k, v in value.items()}
    return value


def may_hold_surrogates(text: str | bytes) -> bool:
    """Whether JSON text has a ``\\uD800``-``\\uDFFF`` escape (one scan; false for nearly every document)."""
    if isinstance(text, bytes):
        return b"\\ud" in text or b"\\uD" in text
    return "\\ud" in text or "\\uD" in text
