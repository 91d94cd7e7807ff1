"""Generated card numbers and ordinary numbers, for the redaction corpus tests.

Card numbers follow the schemes' real prefixes and lengths and pass the Luhn check; ordinary numbers
are what payment telemetry is full of and must survive: epochs in ms and ns, order ids, amounts,
dashed references, and decimal trace ids under a key that names them.
"""

from __future__ import annotations

import random

# (prefixes, length): Visa 13/16/19, Mastercard 51-55 and 2221-2720, Amex, Discover
_SCHEMES: list[tuple[list[str], int]] = [
    (["4"], 16), (["4"], 13), (["4"], 19),
    ([str(p) for p in range(51, 56)], 16), ([str(p) for p in range(2221, 2721, 37)], 16),
    (["34", "37"], 15),
    (["6011", "65", *map(str, range(644, 650))], 16),
]


def _luhn_complete(partial: str) -> str:
    """``partial`` with the check digit that makes it pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return partial + str((10 - total % 10) % 10)


def card_numbers(n: int, rng: random.Random) -> list[str]:
    out = []
    while len(out) < n:
        prefixes, length = rng.choice(_SCHEMES)
        prefix = rng.choice(prefixes)
        body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
        out.append(_luhn_complete(body))
    return out


def spelled(pan: str, rng: random.Random) -> str:
    """A card number as people and URLs write it: whole, or in groups split by a space, dash, %20 or +."""
    separator = rng.choice(["", " ", "-", "%20", "+"])
    if not separator:
        return pan
    groups = [pan[0:4], pan[4:10], pan[10:]] if len(pan) == 15 else [pan[i:i + 4] for i in range(0, len(pan), 4)]
    return separator.join(groups)


def written_forms(pan: str) -> list[bytes]:
    """Every text spelling of ``pan`` that must not be found in stored or printed bytes."""
    groups = [pan[0:4], pan[4:10], pan[10:]] if len(pan) == 15 else [pan[i:i + 4] for i in range(0, len(pan), 4)]
    return [pan.encode()] + [sep.join(groups).encode() for sep in (" ", "-", "%20", "+")]


def ordinary_numbers(n: int, rng: random.Random) -> list[int | str]:
    out: list[int | str] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(rng.randrange(1_600_000_000_000, 1_900_000_000_000))  # epoch in ms
        elif kind == 1:
            out.append(rng.randrange(1_600_000_000_000_000_000, 1_900_000_000_000_000_000))  # epoch in ns
        elif kind == 2:
            out.append(f"ord-{rng.randrange(10**9, 10**10)}")
        elif kind == 3:
            out.append(f"{rng.randrange(1, 100_000)}.{rng.randrange(100):02d}")  # an amount
        elif kind == 4:
            out.append(f"{rng.randrange(2000, 2100)}-{rng.randrange(10**6):06d}-{rng.randrange(10**4):04d}")
        else:
            out.append(str(rng.randrange(10**6, 10**12)))  # a plain id of up to 12 digits
    return out
