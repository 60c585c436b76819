"""The global paged KV pool: one K and one V buffer per KV device, shared by every model.

A page is a fixed number of elements (`page_elems`, in the pool's dtype: `KVPoolLayout.dtype`,
the engine's `EngineConfig.kv_cache_dtype`) and holds ONE
layer's keys (resp. values) for G tokens of one sequence. A model with K KV heads of
head dim H sees a buffer `[P, page_elems]` as `[P, G, K, H]` with `G = page_elems // (K*H)`
(a reshape: no copy), so models of different shapes share the same physical pages and an
idle model holds none. A logical block of G tokens costs a model L pages, one per layer;
its page tables are `int32[L, S, pages_per_seq]`.

With several KV devices each device has its own pair of buffers `[pages_per_device,
page_elems]` (independent pools, as the multi-device shared/static baselines run them: a
model's step runs on one device against that device's pages). Page ids are global in the
host-side bookkeeping: page p lives on device `p // pages_per_device` at local id
`p % pages_per_device` (`local_page_ids`); a step program sees local ids only. The
host-side bookkeeping (which page belongs to whom) is in `allocator.py` /
`kv_cache_manager.py`; this module owns the device memory and the pure functions that view
it and write new K/V into it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_TOKENS_PER_PAGE = 16


def choose_page_elems(kv_head_elems: Sequence[int], min_tokens_per_page: int = MIN_TOKENS_PER_PAGE) -> int:
    """Smallest page size (in elements) that every model can view exactly, with at least
    `min_tokens_per_page` tokens for the model of the widest KV (K*H) row."""
    if not kv_head_elems or any(e <= 0 for e in kv_head_elems):
        raise ValueError(f"kv_head_elems must be positive K*H values, got {list(kv_head_elems)}")
    lcm = math.lcm(*kv_head_elems)
    want = max(kv_head_elems) * min_tokens_per_page
    return lcm * max(1, -(-want // lcm))


def tokens_per_page(page_elems: int, num_kv_heads: int, head_dim: int) -> int:
    row = num_kv_heads * head_dim
    if page_elems % row:
        raise ValueError(f"page_elems {page_elems} is not a multiple of num_kv_heads*head_dim = {row}")
    return page_elems // row


@dataclasses.dataclass(frozen=True)
class KVPoolLayout:
    """Sizes of the pool: pages per device, devices, elements per page, dtype. device_pages:
    the usable pages of each device when they differ (a crosspool arena: page ids
    [d * pages_per_device, d * pages_per_device + device_pages[d]) on device d); () = all."""

    page_elems: int
    pages_per_device: int
    num_devices: int
    dtype: str
    device_pages: tuple = ()

    def __post_init__(self):
        for name in ("page_elems", "pages_per_device", "num_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVPoolLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.device_pages and (len(self.device_pages) != self.num_devices or not all(
                0 <= p <= self.pages_per_device for p in self.device_pages)):
            raise ValueError(f"KVPoolLayout.device_pages {self.device_pages} must give each of the "
                             f"{self.num_devices} devices 0..{self.pages_per_device} pages")

    @property
    def usable_pages(self) -> tuple:
        """Usable pages of each device."""
        return self.device_pages or (self.pages_per_device,) * self.num_devices

    @property
    def num_pages(self) -> int:
        return sum(self.usable_pages)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in the K buffer plus its twin in the V buffer."""
        return 2 * self.page_elems * jnp.dtype(self.dtype).itemsize

    @classmethod
    def from_bytes(cls, pool_bytes: int, page_elems: int, num_devices: int, dtype) -> "KVPoolLayout":
        """Split a byte budget (over all KV devices, K and V together) into pages."""
        per_page = 2 * page_elems * jnp.dtype(dtype).itemsize
        pages_per_device = int(pool_bytes) // num_devices // per_page
        if pages_per_device < 1:
            raise ValueError(f"kv_pool_bytes={pool_bytes} is too small for one page of {per_page} bytes "
                             f"on each of {num_devices} KV device(s)")
        return cls(page_elems, pages_per_device, num_devices, jnp.dtype(dtype).name)


class KVPool:
    """Owns the K and V buffers of every KV device: one pair `[pages_per_device, page_elems]` on
    each device. A step program takes one device's pair (donated) and `put`s the results back."""

    def __init__(self, layout: KVPoolLayout, devices: Sequence[jax.Device]):
        if len(devices) != layout.num_devices:
            raise ValueError(f"KVPool: layout has {layout.num_devices} devices, got {len(devices)}")
        if len(set(devices)) != len(devices):
            raise ValueError(f"KVPool: devices repeat: {list(devices)}")
        self.layout = layout
        self.devices = tuple(devices)
        shape = (layout.pages_per_device, layout.page_elems)
        self.k_buffers: list = []
        self.v_buffers: list = []
        for device in self.devices:
            zeros = jax.jit(lambda: jnp.zeros(shape, layout.dtype),
                            out_shardings=jax.sharding.SingleDeviceSharding(device))
            self.k_buffers.append(zeros())
            self.v_buffers.append(zeros())

    @property
    def nbytes(self) -> int:
        return self.layout.num_pages * self.layout.page_bytes

    def _check(self, device_index: int) -> None:
        if not isinstance(device_index, int) or not 0 <= device_index < len(self.devices):
            raise ValueError(f"KVPool: device_index must be in [0, {len(self.devices)}), got {device_index!r}")

    def take(self, device_index: int = 0) -> tuple[jax.Array, jax.Array]:
        """Hand one device's buffers to a step program (which donates them); `put` the results back."""
        self._check(device_index)
        k, v = self.k_buffers[device_index], self.v_buffers[device_index]
        if k is None:
            raise ValueError(f"KVPool: the buffers of device {device_index} are already taken")
        self.k_buffers[device_index] = self.v_buffers[device_index] = None
        return k, v

    def put(self, k_buffer: jax.Array, v_buffer: jax.Array, device_index: int = 0) -> None:
        self._check(device_index)
        self.k_buffers[device_index], self.v_buffers[device_index] = k_buffer, v_buffer


def local_page_ids(page_ids, pages_per_device: int) -> tuple[int, np.ndarray]:
    """Global page ids that all live on one device -> (that device, its local ids).

    Raises ValueError when the ids span devices (a step runs on one device's pages)."""
    ids = np.asarray(page_ids, np.int32)
    devices = np.unique(ids // pages_per_device)
    if len(devices) != 1:
        raise ValueError(f"page ids {ids.tolist()} lie on devices {devices.tolist()}, not on one device "
                         f"({pages_per_device} pages per device)")
    return int(devices[0]), ids % pages_per_device


def page_view(buffer_PX: jax.Array, num_kv_heads: int, head_dim: int) -> jax.Array:
    """[P, page_elems] -> [P, G, K, H] for one model's geometry (a reshape)."""
    P, X = buffer_PX.shape
    return buffer_PX.reshape(P, tokens_per_page(X, num_kv_heads, head_dim), num_kv_heads, head_dim)


def token_slots(page_indices_LSP: jax.Array, seq_T: jax.Array, positions_T: jax.Array, live_T: jax.Array, *,
                tokens_per_page: int, num_pages: int) -> jax.Array:
    """int32[L, T] pool slot of each token per layer, inside a program: its sequence's page for
    the token's block times G plus the offset; `num_pages * G` (dropped by `write_kv`) where
    not live. Blocks past the table are clamped (such tokens must not be live)."""
    G = tokens_per_page
    block_T = jnp.clip(positions_T // G, 0, page_indices_LSP.shape[2] - 1)
    slots_LT = page_indices_LSP[:, seq_T, block_T] * G + (positions_T % G)[None, :]
    return jnp.where(live_T[None, :], slots_LT, num_pages * G).astype(jnp.int32)


def write_kv(k_pages_PGKH: jax.Array, v_pages_PGKH: jax.Array, k_TKH: jax.Array, v_TKH: jax.Array,
             slots_T: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write the new tokens' K/V at their slots (`page * G + offset`); slots out of range
    (padding rows use `P * G`) are dropped."""
    P, G, K, H = k_pages_PGKH.shape
    k_flat = k_pages_PGKH.reshape(P * G, K, H).at[slots_T].set(k_TKH.astype(k_pages_PGKH.dtype), mode="drop")
    v_flat = v_pages_PGKH.reshape(P * G, K, H).at[slots_T].set(v_TKH.astype(v_pages_PGKH.dtype), mode="drop")
    return k_flat.reshape(P, G, K, H), v_flat.reshape(P, G, K, H)
