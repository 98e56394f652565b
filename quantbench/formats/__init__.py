"""Number formats: how values map to codes and back."""

from quantbench.formats.integer import GridParams, IntFormat
from quantbench.scheme import Scheme


def format_for(scheme: Scheme) -> IntFormat:
    if scheme.format == "int":
        return IntFormat(bits=scheme.bits, symmetric=scheme.symmetric)
    raise ValueError(f"unknown format {scheme.format!r}")


__all__ = ["GridParams", "IntFormat", "format_for"]
