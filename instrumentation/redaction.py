"""Keep card numbers, CVVs and credentials out of telemetry: in the service and again in storage.

A card number (PAN) is 13 to 19 digits, written whole or in groups split by one space, dash, ``+``
or URL-encoded separator, that starts with an issuer prefix (IIN) of a length that issuer uses and
passes the Luhn check. All three are required, so ordinary numbers (epochs in ms and ns, order
ids, amounts) are left alone: an epoch starts with ``1``, which no card issuer uses. A decimal
trace or span id can look like a card number; it is kept when its key or the text right before it
says it is one (``trace_id=...``). Everything a span or a log record can carry goes through
:func:`redact_any`: names, keys and values at any depth, integers and floats.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

# --- card numbers ------------------------------------------------------------------------------

# (first digits low, high, lengths): the issuer ranges of the schemes in use (Visa, Mastercard, Amex,
# Discover, Diners, JCB, UnionPay, Maestro, Mir, RuPay, Troy, Verve).
_LONG = (16, 17, 18, 19)
_IIN_RANGES: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (4, 4, (13, 16, 19)),
    (51, 55, (16,)), (2221, 2720, (16,)),
    (34, 34, (15,)), (37, 37, (15,)),
    (6011, 6011, _LONG), (644, 649, _LONG), (65, 65, _LONG), (622126, 622925, _LONG),
    (300, 305, (14, *_LONG)), (36, 36, (14, *_LONG)), (38, 39, _LONG),
    (3528, 3589, _LONG),
    (62, 62, _LONG), (81, 82, (16,)),
    (5018, 5018, (13, 15, *_LONG)), (5020, 5020, (13, 15, *_LONG)), (5038, 5038, (13, 15, *_LONG)),
    (5893, 5893, (13, 15, *_LONG)), (6304, 6304, (13, 15, *_LONG)), (6759, 6759, (13, 15, *_LONG)),
    (6761, 6763, (13, 15, *_LONG)),
    (2200, 2204, _LONG), (60, 60, (16,)), (508, 508, (16,)), (9792, 9792, (16,)),
    (506099, 506198, (16, 18, 19)), (650002, 650027, (16, 18, 19)),
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def has_issuer_prefix(digits: str) -> bool:
    """Whether ``digits`` starts with a card issuer's prefix, at a length that issuer uses."""
    length = len(digits)
    for low, high, lengths in _IIN_RANGES:
        width = len(str(low))
        if length in lengths and low <= int(digits[:width]) <= high:
            return True
    return False


def is_card_number(digits: str) -> bool:
    """Whether a string of bare digits is a card number: length, issuer prefix and Luhn check."""
    return 13 <= len(digits) <= 19 and digits.isdigit() and has_issuer_prefix(digits) and luhn_valid(digits)


# One separator between digits: a space, tab, dash, plus or their URL encodings.
_SEP = r"(?:[ \t+\-\u00a0]|%20|%2[bBdD])"
# A card number's digits: ASCII, or the fullwidth forms an East Asian input method types (U+FF10-FF19); the
# byte scan of a request (may_need_redaction) looks for exactly these, so both ways of decoding agree.
_D = "0-9\uff10-\uff19"
_DIGIT_RUN = re.compile(rf"(?<![{_D}])[{_D}](?:{_SEP}?[{_D}]){{11,30}}(?![{_D}])")
_SEP_RE = re.compile(_SEP)
# A cheap test first: most text has no run of 13 digit-or-separator characters.
_MAYBE_PAN = re.compile(rf"[{_D}][{_D} \t+\-%bBdD\u00a0]{{11,}}[{_D}]")
# A decimal trace or span id, said to be one by what comes right before it.
_ID_BEFORE = re.compile(r"(?i)(?:trace|span|parent)[_.\-]?id[\"']?\s*[:=]\s*[\"']?$")


def _card_window(run: str) -> tuple[int, int] | None:
    """Where a card number lies in a run of digit groups (``_DIGIT_RUN``), or None. A card number may share
    the run with a neighbour ("ref 12 4111 1111 1111 1111 cvv 123"), so every run of whole groups is tried,
    longest first."""
    groups, at = [], 0
    for sep in _SEP_RE.finditer(run):
        groups.append((at, sep.start()))
        at = sep.end()
    groups.append((at, len(run)))
    if len(groups) == 1:
        return (0, len(run)) if is_card_number(run) else None
    n = len(groups)
    for size in range(n, 0, -1):
        for first in range(0, n - size + 1):
            last = first + size - 1
            digits = "".join(run[a:b] for a, b in groups[first:last + 1])
            if is_card_number(digits):
                return groups[first][0], groups[last][1]
    return None


def _mask_run(match: re.Match[str]) -> str:
    text = match.group(0)
    if _ID_BEFORE.search(match.string, max(0, match.start() - 24), match.start()):
        return text
    window = _card_window(text)
    return text if window is None else text[:window[0]] + REDACTED + text[window[1]:]


# --- other secrets in free text ----------------------------------------------------------------

_CVV_TEXT = re.compile(
    r"(?i)((?:card[_.\- ]?)?(?:cvv2?|cvc2?|cvn2?|csc|security[_.\- ]?code|card[_.\- ]?verification"
    r"(?:[_.\- ]?(?:value|code))?)[\"']?\s*[:=]?\s*[\"']?)(\d{3,4})(?!\d)")
_AUTH_TEXT = re.compile(r"(?i)((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer |basic |digest )?"
                        r"[^\s\"',;]+")
_COOKIE_TEXT = re.compile(r"(?i)((?:set-)?cookie[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+")


def _has_secret_word(lowered: str) -> bool:
    """Whether lower-cased text holds a word the CVV, Authorization and Cookie patterns start from (cvv, cvc,
    cvn, csc, security, verification, authorization, cookie): tested in line, as this runs on every string stored."""
    return ("cv" in lowered or "csc" in lowered or "secur" in lowered or "verif" in lowered or "authoriz" in lowered
            or "cookie" in lowered)


def redact_text(text: str) -> str:
    """``text`` with card numbers, CVV values, Authorization and Cookie values masked."""
    if not text or len(text) < 3:  # too short for a card number or any of the words
        return text
    if _MAYBE_PAN.search(text):
        text = _DIGIT_RUN.sub(_mask_run, text)
    if _has_secret_word(text.lower()):
        text = _CVV_TEXT.sub(lambda m: m.group(1) + REDACTED, text)
        text = _AUTH_TEXT.sub(lambda m: m.group(1) + REDACTED, text)
        text = _COOKIE_TEXT.sub(lambda m: m.group(1) + REDACTED, text)
    return text


# --- keys --------------------------------------------------------------------------------------

_WORD_SPLIT = re.compile(r"[A-Z]?[a-z]+\d*|[A-Z]+\d*(?![a-z])|\d+")
_SECRET_WORDS = frozenset({
    "authorization", "cookie", "cookies", "password", "passwd", "pwd", "secret", "cvv", "cvv2", "cvc", "cvc2",
    "cvn", "cvn2", "csc", "pan", "apikey", "passphrase", "pin"})
_SECRET_PAIRS = frozenset({
    ("api", "key"), ("card", "number"), ("card", "num"), ("card", "no"), ("security", "code"),
    ("card", "verification"), ("set", "cookie"), ("account", "number"), ("private", "key"),
    ("idempotency", "key")})
_TOKEN_LAST = frozenset({"token", "jwt", "credential", "credentials"})
_ID_WORDS = frozenset({"traceid", "spanid", "parentid"})
_secret_keys: dict[str, bool] = {}
_id_keys: dict[str, bool] = {}


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether an attribute key names a secret, in any spelling (``card_cvv``, ``cardCvv``, ``X-Api-Key``)."""
    known = _secret_keys.get(key)
    if known is None:
        words = _words(key)
        known = (any(w in _SECRET_WORDS for w in words)
                 or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))
                 or (bool(words) and words[-1] in _TOKEN_LAST))
        if len(_secret_keys) < 100_000:
            _secret_keys[key] = known
    return known


def is_id_key(key: str) -> bool:
    """Whether a key names a trace or span id (whose decimal form may look like a card number)."""
    known = _id_keys.get(key)
    if known is None:
        words = _words(key)
        known = len(words) >= 2 and words[-1] == "id" and words[-2] in ("trace", "span", "parent") \
            or bool(words) and words[-1] in _ID_WORDS
        if len(_id_keys) < 100_000:
            _id_keys[key] = known
    return known


# --- values at any depth -----------------------------------------------------------------------

_BIG = 10**12  # below this, no integer has the 13 digits of the shortest card number


def _number_is_card(value: int | float) -> bool:
    if isinstance(value, float):
        if not (value >= _BIG and value.is_integer() and value < 1e19):
            return False
        value = int(value)
    return value >= _BIG and is_card_number(str(value))


def redact_any(value: Any, key: str = "", text_clean: bool = False) -> Any:
    """``value`` with every secret masked: strings, numbers, lists and tuples, mappings (keys too). With
    ``text_clean``, its strings and keys are known to hold no text to mask (:func:`text_may_need_redaction`
    said so of where they were cut from): only secret keys and numbers are looked at."""
    if key and is_secret_key(key):
        return REDACTED
    if isinstance(value, str):
        return value if text_clean else redact_text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return REDACTED if not is_id_key(key) and _number_is_card(value) else value
    if isinstance(value, dict):
        return redact_attributes(value, text_clean)
    if isinstance(value, (list, tuple)):
        masked = [redact_any(v, key, text_clean) for v in value]
        return tuple(masked) if isinstance(value, tuple) else masked
    return value


_clean_keys: set[str] = set()  # attribute keys already seen to hold nothing to mask (never one that did)


def _masked_key(key: str) -> str:
    if key in _clean_keys:
        return key
    masked = redact_text(key)
    if masked == key and len(_clean_keys) < 100_000:
        _clean_keys.add(key)
    return masked


def redact_attributes(attrs: Any, text_clean: bool = False) -> dict[str, Any]:
    """A copy of ``attrs`` that is safe to store: keys masked where they hold a number, secret values masked
    (``text_clean``: as in :func:`redact_any`)."""
    out: dict[str, Any] = {}
    if text_clean:
        for k, v in attrs.items():
            if type(v) is str:  # the common case, in line: only its key can make it a secret
                secret = _secret_keys.get(k)
                out[k] = REDACTED if (is_secret_key(k) if secret is None else secret) else v
            else:
                out[k] = redact_any(v, k, True)
        return out
    for k, v in attrs.items():
        key = _masked_key(k)
        if is_id_key(k) and isinstance(v, str) and v.isdigit():
            out[key] = v
        else:
            out[key] = redact_any(v, k)
    return out


# Anything in a raw request that could need masking in its strings; a request without any skips the
# per-string work. Keys, integers and floats are checked by the caller: a number is not text on the wire.
# (The words are looked for with bytes.find in the lower-cased bytes: a case-insensitive alternation in one
# pattern costs about 40 us a span, more than everything else the collector does with one.)
_SUSPECT_CHARS = "0123456789 \t+-%bBdD"  # digits and the separators of _SEP (%20, %2B and %2D spelled out)
_SUSPECT_DIGITS = re.compile(f"[0-9][{re.escape(_SUSPECT_CHARS)}]{{11,}}[0-9]".encode())
_SUSPECT_WORDS = (b"cvv", b"cvc", b"cvn", b"csc", b"security", b"verification", b"authorization", b"cookie")
# Those that start with "c" are looked for with one pattern: a pattern whose every branch starts with the same letter
# skips from one of that letter to the next at the speed of a find (four finds of three letters took 0.9 us a span
# of a request, the pattern 0.13); a branch that starts with another letter would make it try every byte.
_C_WORDS = re.compile(b"c(?:" + b"|".join(re.escape(w[1:]) for w in _SUSPECT_WORDS if w[:1] == b"c") + b")")
_OTHER_WORDS = tuple(w for w in _SUSPECT_WORDS if w[:1] != b"c")


def _has_suspect_word(lower: bytes) -> bool:
    """Whether lower-cased bytes hold one of ``_SUSPECT_WORDS``."""
    return any(word in lower for word in _OTHER_WORDS) or _C_WORDS.search(lower) is not None

# Every byte of _SUSPECT_DIGITS' class as 1, every other as 0: a match needs 13 of them in a row, which
# bytes.translate and a search for 13 ones find 15 times faster than the pattern tries each digit of a body
# (random binary ids are full of them).
_SUSPECT_CLASS = bytes(int(chr(i) in _SUSPECT_CHARS) for i in range(256))
_SUSPECT_RUN = b"\x01" * 13
_FULLWIDTH_DIGIT = re.compile(b"\xef\xbc[\x90-\x99]")
_NBSP_BETWEEN_DIGITS = re.compile(b"[0-9]\xc2\xa0[0-9]")  # between fullwidth digits: those are found anyway
# Lower-cased ASCII with %20, %2b and %2d made the separators they encode, then digits as 1, separators as 2:
# a match of _DIGIT_RUN is digits with at most one separator between two, never two twos in a row, so with every
# pair of twos made zeros and the twos left dropped, one of 13 digits or more (a card number's least) leaves 13
# ones in a row.
_SUSPECT_DIGIT_CLASS = bytes(1 if 48 <= i <= 57 else 2 if chr(i) in " \t+-" else 0 for i in range(256))


def _may_hold_card_digits(lower: bytes) -> bool:
    digits = lower.replace(b"%20", b" ").replace(b"%2b", b"+").replace(b"%2d", b"-").translate(_SUSPECT_DIGIT_CLASS)
    return _SUSPECT_RUN in digits.replace(b"\x02\x02", b"\0\0").replace(b"\x02", b"")


_DIGIT_RUN_ASCII = re.compile(rb"(?<![0-9])[0-9](?:(?:[ \t+\-]|%20|%2[bd])?[0-9]){11,30}(?![0-9])")  # lower-cased


def may_need_redaction(raw: bytes) -> bool:
    """False when the strings of a serialized request hold nothing :func:`redact_text` could change."""
    if _SUSPECT_RUN in raw.translate(_SUSPECT_CLASS) and _SUSPECT_DIGITS.search(raw) is not None:
        return True
    if b"\xc2\xa0" in raw and _NBSP_BETWEEN_DIGITS.search(raw) is not None:  # a no-break space between digit
        return True                                                                # groups (random ids hold many)
    if b"\xef\xbc" in raw and _FULLWIDTH_DIGIT.search(raw) is not None:  # a fullwidth digit
        return True
    return _has_suspect_word(raw.lower())


def text_may_need_redaction(text: str) -> bool:
    """False when no piece of ``text`` cut out between two characters that are not both digits can hold what
    :func:`redact_text` masks: no run of digit groups holds a card number (whatever the text before it says: a
    piece cut after ``trace_id=`` no longer says it) and no word a secret pattern starts from is in it.

    A parser that cuts a line only where a digit does not meet a digit (at quotes, brackets, ``=``, spaces)
    gives strings that need no masking when the line needs none; one that decodes escapes (JSON's
    ``\\u0034``) does not, and the caller must not ask this of its lines. Meant for many lines at once: ASCII
    text is scanned as bytes, and the digit pattern tried only where 13 of its characters stand in a row."""
    if not text.isascii():  # other digits, the no-break space: the patterns themselves, over all of it
        return (bool(_MAYBE_PAN.search(text))
                and any(_card_window(m.group(0)) is not None for m in _DIGIT_RUN.finditer(text))
                or _has_secret_word(text.lower()))
    lower = text.encode("ascii").lower()
    if _has_suspect_word(lower):
        return True
    if _may_hold_card_digits(lower):  # then line by line (no run crosses a line end), the pattern where it may
        for line in lower.split(b"\n"):
            if _may_hold_card_digits(line) and any(_card_window(m.group(0).decode("ascii")) is not None
                                                   for m in _DIGIT_RUN_ASCII.finditer(line)):
                return True
    return False
