"""Counter-based randomness: integer hashes of lattice coordinates and seeds.

Everything random in a synthetic image is a pure function of (seed, position), so any
chunk can be rendered alone and two runs with the same seed give the same bytes. There is
no global array of seeds and no stateful generator shared between chunks.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_PY = np.uint32(0x8DA6B343)  # odd multipliers that decorrelate the two lattice axes
_PX = np.uint32(0xD8163841)
_INV_2_32 = np.float32(1.0 / 4294967296.0)


def derive_seed(seed: int, *labels: object) -> int:
    """A 32-bit seed for one named use of `seed` (stable across processes and platforms).

    Python's `hash()` of a str is salted per process, so a digest is used instead.
    """
    text = repr((int(seed),) + tuple(str(label) for label in labels)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


def mix32(x: np.ndarray) -> np.ndarray:
    """The `lowbias32` integer finaliser (Chris Wellons): uint32 array -> uint32 array."""
    x = np.asarray(x, dtype=np.uint32)
    if x.ndim == 0:
        return np.uint32(_mix_int(int(x)))
    x = x ^ (x >> np.uint32(16))
    x *= _M1
    x ^= x >> np.uint32(15)
    x *= _M2
    x ^= x >> np.uint32(16)
    return x


def hash2(iy: np.ndarray, ix: np.ndarray, seed: int) -> np.ndarray:
    """uint32 hash of integer lattice points (iy, ix) (any int dtype, broadcast) and `seed`."""
    iy = np.asarray(iy).astype(np.uint32)  # negative cells wrap, which is fine for a hash
    ix = np.asarray(ix).astype(np.uint32)
    h = mix32(iy * _PY ^ np.uint32(seed & 0xFFFFFFFF))
    return mix32(h ^ (ix * _PX))


def rehash(h: np.ndarray, k: int) -> np.ndarray:
    """An independent uint32 stream `k` from hashes `h` (a second, third ... value per cell)."""
    return mix32(h ^ np.uint32((0x9E3779B9 * (k + 1)) & 0xFFFFFFFF))


def unit(h: np.ndarray) -> np.ndarray:
    """uint32 hashes -> float32 in [0, 1)."""
    # 24 high bits so the float32 result is exact and strictly below 1
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)


def _mix_int(v: int) -> int:
    """`mix32` of one Python int (numpy warns on overflowing uint32 scalar products)."""
    v &= 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def hash1(i: np.ndarray, seed: int) -> np.ndarray:
    """uint32 hash of integers `i` (e.g. row indices) and `seed`."""
    return mix32(np.asarray(i).astype(np.uint32) * _PY ^ np.uint32(_mix_int(seed)))
