"""Powers of two, for tile and grid sizes (Triton block shapes must be powers of two)."""
from __future__ import annotations


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n < 2)."""
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << max(0, int(n).bit_length() - 1)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
