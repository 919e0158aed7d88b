"""Sizes, durations and names, parsed and printed the same way everywhere.

Sizes are **binary**: ``K``, ``M``, ``G``, ``T`` mean the same as ``KiB``,
``MiB``, ``GiB``, ``TiB`` (powers of 2^10), as QEMU's ``-m 1G`` does. The
suffixes ``KB``, ``MB``, ``GB``, ``TB`` are refused because they are read both
ways in the field; the error says to write ``GiB`` or ``G``. A bare integer is a
number of bytes. Fractions are allowed when they give a whole number of bytes
(``1.5GiB``).
"""

from __future__ import annotations

import math
import re

# a guest's or network's name: a DNS label (it becomes a hostname, a path component and a
# part of kernel object names); here, a leaf, so that checking one costs no schema import
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")
_PRINT_UNITS = (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                ("KiB", 1 << 10))


class UnitError(ValueError):
    """A size or duration could not be parsed; the message says what is accepted."""


def parse_size(value: object) -> int:
    """Parse a size into bytes. Accepts int bytes or a string such as ``512MiB``."""
    if isinstance(value, bool):
        raise UnitError(f"expected a size such as 512MiB or 1G, got boolean {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, float):
        raise UnitError(f"a size needs a unit unless it is whole bytes, got {value!r}; "
                        "write e.g. 512MiB or 1G")
    if not isinstance(value, str):
        raise UnitError(f"expected a size such as 512MiB or 1G, got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m:
        raise UnitError(f"cannot parse size {value!r}: expected a number and a unit such as "
                        "512MiB, 1GiB, 1G, 1024M, or plain bytes")
    unit = m["unit"].lower()
    if unit.endswith("ib") and len(unit) == 3:
        unit = unit[0]
    elif unit in ("kb", "mb", "gb", "tb", "pb"):
        raise UnitError(f"ambiguous unit in {value!r}: sizes are binary here; "
                        f"write {m['num']}{unit[0].upper()}iB (or {m['num']}{unit[0].upper()})")
    if unit not in _SIZE_UNITS:
        raise UnitError(f"unknown size unit {m['unit']!r} in {value!r}: use B, K/KiB, M/MiB, "
                        "G/GiB or T/TiB")
    num, mult = m["num"], _SIZE_UNITS[unit]
    if "." in num:
        whole, frac = num.split(".")
        numerator = int(whole + frac) * mult
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise UnitError(f"size {value!r} is not a whole number of bytes")
        return numerator // denominator
    return int(num) * mult


def format_size(n: int) -> str:
    """Exact form: the largest binary unit that divides ``n`` (``1GiB``, ``1536MiB``, ``17``).

    ``parse_size(format_size(n)) == n`` for every non-negative int.
    """
    if n < 0:
        raise ValueError("negative size")
    for name, mult in _PRINT_UNITS:
        if n >= mult and n % mult == 0:
            return f"{n // mult}{name}"
    return str(n)


def human_size(n: float | int | None, precision: int = 1) -> str:
    """Rounded form for tables: ``1.5 GiB``, ``200 MiB``. ``None`` prints as ``-``."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for name, mult in _PRINT_UNITS:
        if n >= mult:
            v = n / mult
            text = f"{v:.{precision}f}".rstrip("0").rstrip(".") if precision else f"{v:.0f}"
            return f"{sign}{text} {name}"
    return f"{sign}{int(n)} B"


# rates: bytes per second. Bits are decimal, as tc and every NIC's data sheet count them
# (1Mbit = 10^6 bits); bytes are binary, as sizes are (10MiB/s, 10M/s).
_RATE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)(?P<ps>/s)?\s*$")
_BIT_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(value: object) -> int:
    """Parse a rate into bytes per second: ``100Mbit``, ``1Gbit`` (bits, decimal), or a size
    per second, ``10MiB/s``, ``10M/s`` (binary, as sizes). A bare integer is bytes/s.
    Zero is refused: a limit of nothing is no limit to set."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UnitError(f"expected a rate such as 100Mbit or 10MiB/s, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _RATE_RE.match(value)
        if not m:
            raise UnitError(f"cannot parse rate {value!r}: expected e.g. 100Mbit, 1Gbit, "
                            "10MiB/s or bytes per second")
        unit = m["unit"].lower()
        if unit in _BIT_UNITS:
            if m["ps"]:
                raise UnitError(f"{value!r}: write bits without /s, as 100Mbit")
            n = round(float(m["num"]) * _BIT_UNITS[unit] / 8)
        elif unit in ("bps", "kbps", "mbps", "gbps"):
            raise UnitError(f"ambiguous unit in {value!r}: write {m['num']}"
                            f"{unit[0].upper() if len(unit) > 3 else ''}bit for bits, or "
                            f"{m['num']}{unit[0].upper() if len(unit) > 3 else ''}iB/s for bytes")
        else:
            try:
                n = parse_size(m["num"] + m["unit"])
            except UnitError as e:
                raise UnitError(str(e).replace("size", "rate")) from None
    if n <= 0:
        raise UnitError(f"a rate of {value!r} lets nothing through; leave the limit out "
                        "for none")
    return n


def format_rate(n: int) -> str:
    """Exact form: ``50Mbit`` when it is a whole number of Mbit (or Gbit, Kbit), else
    ``10MiB/s``. ``parse_rate(format_rate(n)) == n``."""
    for name, mult in (("Gbit", 10**9), ("Mbit", 10**6), ("Kbit", 10**3)):
        if (n * 8) % mult == 0:
            return f"{n * 8 // mult}{name}"
    size = format_size(n)
    return f"{size}/s" if not size.isdigit() else size


def human_rate(n: float | int | None) -> str:
    """Rounded, for tables: ``12.5 MiB/s``; ``-`` for None."""
    return "-" if n is None else f"{human_size(n)}/s"


_DUR_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DUR_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Parse a duration into seconds: ``500ms``, ``1s``, ``2m``, ``1h``, ``7d`` or a number."""
    if isinstance(value, bool):
        raise UnitError(f"expected a duration such as 1s or 500ms, got boolean {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise UnitError(f"duration must be a finite non-negative number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UnitError(f"expected a duration such as 1s or 500ms, got {type(value).__name__}")
    m = _DUR_RE.match(value)
    if not m:
        raise UnitError(f"cannot parse duration {value!r}: expected e.g. 500ms, 1s, 2m, 1h or 7d")
    return float(m["num"]) * _DUR_UNITS[m["unit"] or "s"]


def format_duration(seconds: float) -> str:
    """Short form for tables and plan output: ``500ms``, ``1s``, ``1m30s``, ``2h``, ``7d``."""
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    s = round(seconds)
    if s % 86400 == 0 and s:
        return f"{s // 86400}d"
    parts = []
    for name, mult in (("h", 3600), ("m", 60), ("s", 1)):
        if s >= mult or (name == "s" and not parts):
            q, s = divmod(s, mult)
            if q or name == "s":
                parts.append(f"{q}{name}")
    return "".join(parts) if parts else "0s"


def human_duration(s: float) -> str:
    """Approximate, for people reading reports: ``98 s``, ``12 min``, ``3.5 h``, ``6.9 d``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def human_uptime(s: float | None) -> str:
    """An uptime for tables, in whole seconds and at most two units: ``0s``, ``42s``,
    ``5m07s``, ``3h02m``, ``2d05h``. ``None`` prints as ``-``."""
    if s is None:
        return "-"
    n = int(max(s, 0))
    d, n = divmod(n, 86400)
    h, n = divmod(n, 3600)
    m, sec = divmod(n, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"
