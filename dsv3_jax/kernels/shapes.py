"""Integer shape arithmetic: how many blocks cover a length, and the length they cover.

Both take Python ints (static shapes) and integer jax arrays (traced counts) alike: no float division, so the
result is exact and keeps the operands' integer dtype.
"""

from __future__ import annotations


def cdiv(a, b):
    """ceil(a / b) for a >= 0, b > 0: how many blocks of b cover a."""
    return -(-a // b)


def round_up(a, m):
    """a rounded up to a multiple of m (m > 0): the length whole blocks of m cover."""
    return cdiv(a, m) * m
