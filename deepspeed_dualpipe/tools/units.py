"""Times and sizes as the command line takes them: ``3.75ms``, ``512KiB``, ``24GiB``."""

import argparse
import re

TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1 << 30
}


class UnitError(argparse.ArgumentTypeError, ValueError):
    """A time or size that does not parse: argparse prints its message after the option's name."""


def parse_time(text: str) -> float:
    """``"3.75ms"``, ``"0.004"`` -> seconds (units s, ms, us; none means seconds)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e-?[0-9]+)?)\s*(s|ms|us)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UnitError(f"bad time {text!r}: expected a time such as 3.75ms")
    return float(match[1]) * TIME_UNITS[(match[2] or "").lower()]


def parse_bytes(text: str) -> int:
    """``"1MiB"``, ``"512k"``, ``"24GiB"``, ``"1048576"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match[2].lower() not in BYTE_UNITS:
        raise UnitError(f"bad size {text!r}: expected bytes such as 1048576, 512KiB or 1MiB")
    return int(float(match[1]) * BYTE_UNITS[match[2].lower()])
