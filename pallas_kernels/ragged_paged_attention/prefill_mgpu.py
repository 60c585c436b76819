"""Prefill attention over the paged KV pool on Hopper: a Pallas kernel through Mosaic GPU
(TMA copies into shared memory, wgmma for both products), for
`ragged_paged_attention(..., backend="mgpu")`.

What it computes: reference.py's contract without the options below. q [T, N, H] packs the
new tokens of the sequences; sequence s owns q[cu_q_lens[s]:cu_q_lens[s+1]], the last tokens
of its kv_lens[s]-token context (a chunk at the end of a cached prefix, or a whole prompt),
causal within it; rows past cu_q_lens[num_seqs] come back as zeros.

Blocks. Every sequence's queries are cut into blocks of `PrefillConfig.rows` rows (its last
block may be partial), and `block_table` lays the blocks out (plain jnp on S-sized arrays,
outside the kernel): per block its sequence, the absolute position of its first row, the
sequence's kv_len and its key-page count (pages up to its last real row's position). q is
gathered into that block layout ([NB * rows, N, H], NB = cdiv(T, rows) + S, an upper bound on
the blocks; a partial block's spare rows repeat a real row and are dropped) and the output is
gathered back, so the kernel's TMA copies are all whole, aligned tiles. Both gathers are one
pass over q / out: small beside the attention of a long prefill, not for decode rows (each
decode token costs a whole block: "auto" keeps decode on gpu.py).

Grid (NB, N): one program per (block, query head), the heads fastest so the programs of one
GQA group run side by side and read the same K/V pages from L2, the blocks in reverse order
(a sequence's later blocks walk more pages under the causal mask: the longest start first).
The sequence's pages are walked one page of G keys per step through the page table (a scalar
read of page_indices, clamped, plus the static page offset): each page's K and V tile [G, H]
(pool[page, :, kv_head, :], a strided 2-D TMA box) lands in a ring of `num_slots`
shared-memory slots, signalled by a barrier per slot. A compute warpgroup owns `block_q` rows:
its q tile is copied once; per page S = q K^T and P V by wgmma, online softmax in float32
(base 2, sm_scale * log2(e) folded into the scores); the pages wholly at or before its first
row run unmasked, the rest under the causal and kv_len mask (`warpgroup_pages`); a page's V
slots past kv_len are zeroed in shared memory first (0 * NaN would be NaN), so stale or NaN
slots never reach the output. Its output tile goes back through shared memory by TMA. Two
schedules (`PrefillConfig`):
- one warpgroup (default): it issues the first num_slots pages' copies, then refills a slot
  with page step + num_slots as soon as it is done with page step;
- warp_specialized: a producer warpgroup (40 registers) issues every copy, waiting for a
  slot's "free" barrier, which each of `compute_wgs` (1 or 2) compute warpgroups arrives on
  once per page, computed or not (the first warpgroup's rows need fewer pages than the
  second's); as FlashAttention-3 splits memory and compute, without its ping-pong of the two
  compute warpgroups' softmax and wgmma.
K/V traffic: a page tile feeds the rows of one program, so 64 rows per tile (the default)
read 64 FLOP per byte from L2 and 128 rows (block_q=128, or two compute warpgroups) twice as
many; bench.bench_prefill times both.

Not taken (the caller falls back to gpu.py; an explicit backend="mgpu" raises, see
`kernel_problem`): soft caps, sliding windows, attention sinks, MLA's latent form, float32,
head dims other than 64 / 128, page sizes other than 64 / 128. Not yet: the K/V of a GQA
group shared in one program (its query heads as rows of one tile), the page table row read
into shared memory once, the compute warpgroups' ping-pong, a persistent grid; "auto" does
not pick this kernel until a GPU measures it (bench.bench_prefill).

Interpret mode (`interpret=True`): Mosaic GPU's interpreter (a private module of JAX 0.10,
`gpu_interpreter`) runs the kernel on a CPU: its block table, page walk, TMA copies, barriers,
masks, online softmax and output gather. Its wgmma takes neither a transposed nor an
in-register operand, so there the two products run as plain dots and the register layouts are
unused; the wgmma operands are checked by the CUDA lowering test (their structure) and by the
gpu-marked tests (their numbers).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

HEAD_DIMS = (64, 128)
PAGE_SIZES = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
_LOG2E = math.log2(math.e)
MAX_GRID_Y = 65535                              # CUDA's limit on the blocks axis
_SWIZZLE = 128                                  # bytes: 64 bf16 columns per swizzled row


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tiling of the kernel. `block_q`: query rows per compute warpgroup (64 per wgmma; 64 or
    128). `num_slots`: K/V pages in flight (a ring of shared-memory slots, >= 2).
    `warp_specialized`: a producer warpgroup issues the TMA copies and `compute_wgs` (1 or 2)
    warpgroups compute, each on its own block_q rows of the program's block; without it one
    warpgroup does both (compute_wgs must be 1)."""
    block_q: int = 64
    num_slots: int = 2
    warp_specialized: bool = False
    compute_wgs: int = 1

    def __post_init__(self):
        if self.block_q not in (64, 128):
            raise ValueError(f"block_q must be 64 or 128, got {self.block_q}")
        if self.num_slots < 2:
            raise ValueError(f"num_slots must be >= 2, got {self.num_slots}")
        if self.compute_wgs not in (1, 2) or (self.compute_wgs > 1 and not self.warp_specialized):
            raise ValueError(f"compute_wgs must be 1, or 2 with warp_specialized, got {self.compute_wgs}")

    @property
    def rows(self) -> int:
        """Query rows per program."""
        return self.block_q * self.compute_wgs


DEFAULT_CONFIG = PrefillConfig()


def kernel_problem(q_TNH, k_pages_PGKH, *, soft_cap=None, sliding_window=None, sinks=None,
                   latent_value_dim=None):
    """Why the kernel cannot take this call (None: it can); shapes and static options only."""
    H, (G, K) = q_TNH.shape[-1], k_pages_PGKH.shape[1:3]
    if latent_value_dim is not None:
        return "MLA's latent attention (latent_value_dim)"
    for name, value in (("soft caps", soft_cap), ("sliding windows", sliding_window),
                        ("attention sinks", sinks)):
        if value is not None:
            return name
    if jnp.dtype(q_TNH.dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"dtype {q_TNH.dtype} (bfloat16 or float16 only)"
    if q_TNH.dtype != k_pages_PGKH.dtype:
        return f"q dtype {q_TNH.dtype} != pages dtype {k_pages_PGKH.dtype}"
    if H not in HEAD_DIMS:
        return f"head dim {H} (takes {HEAD_DIMS})"
    if G not in PAGE_SIZES:
        return f"page size {G} (takes {PAGE_SIZES})"
    if q_TNH.shape[1] % K:
        return f"{q_TNH.shape[1]} query heads over {K} kv heads"
    return None


def gpu_interpreter():
    """Mosaic GPU's interpreter parameters (a private module of JAX 0.10); a ValueError where
    this JAX has none."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        raise ValueError(f"this JAX ({jax.__version__}) has no Mosaic GPU interpreter: {e}") from e
    return InterpretGPUParams()


def max_blocks(T: int, S: int, block_q: int) -> int:
    """An upper bound on the query blocks of T rows over S sequences: every sequence adds at
    most one partial block to cdiv(T, block_q)."""
    return -(-T // block_q) + S


def block_table(kv_lens_S, cu_q_lens_S1, num_seqs, *, T: int, G: int, block_q: int, pages_per_seq: int):
    """The blocks' layout (traced, plain jnp): (meta [NB, 4] int32, rows [NB * block_q], out_rows [T]).

    meta per block: sequence, position of its first row, kv_len, key pages to walk (up to its
    last real row); a block past the last has 0 pages. rows: the q row each block
    row reads (spare rows of a partial block repeat its sequence's last row). out_rows: the
    block row each token's output comes from."""
    S = kv_lens_S.shape[0]
    NB = max_blocks(T, S, block_q)
    ns = jnp.reshape(num_seqs, ())
    s_idx = jnp.arange(S, dtype=jnp.int32)
    q_len_S = jnp.where(s_idx < ns, cu_q_lens_S1[1:] - cu_q_lens_S1[:-1], 0)
    nb_S = (q_len_S + block_q - 1) // block_q
    first_S1 = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(nb_S).astype(jnp.int32)])
    b = jnp.arange(NB, dtype=jnp.int32)
    seq_B = jnp.clip(jnp.searchsorted(first_S1[1:], b, side="right"), 0, S - 1).astype(jnp.int32)
    live_B = b < first_S1[S]
    i_B = b - first_S1[seq_B]                                   # block index within its sequence
    kv_B = kv_lens_S[seq_B]
    ql_B = q_len_S[seq_B]
    start_B = i_B * block_q                                     # first row, within the chunk
    pos0_B = kv_B - ql_B + start_B
    last_B = jnp.minimum(start_B + block_q, ql_B) - 1           # last real row, within the chunk
    keys_B = jnp.minimum(kv_B - ql_B + last_B + 1, kv_B)
    pages_B = jnp.where(live_B, jnp.minimum((keys_B + G - 1) // G, pages_per_seq), 0)
    meta = jnp.stack([seq_B, pos0_B, kv_B, pages_B], axis=1)
    r = jnp.arange(block_q, dtype=jnp.int32)
    within = jnp.minimum(start_B[:, None] + r[None, :], jnp.maximum(ql_B[:, None] - 1, 0))
    rows = jnp.clip(cu_q_lens_S1[seq_B][:, None] + within, 0, T - 1).reshape(-1)
    t = jnp.arange(T, dtype=jnp.int32)
    seq_T = jnp.clip(jnp.searchsorted(cu_q_lens_S1[1:], t, side="right"), 0, S - 1).astype(jnp.int32)
    off_T = t - cu_q_lens_S1[seq_T]
    out_rows = (first_S1[seq_T] + off_T // block_q) * block_q + off_T % block_q
    return meta.astype(jnp.int32), rows, jnp.clip(out_rows, 0, NB * block_q - 1)


def warpgroup_pages(pos, kv_len, n_pages, block_q: int, G: int):
    """(pages, unmasked pages) of the compute warpgroup whose block_q rows start at position
    `pos`, in a block that walks n_pages: the pages up to its last row's keys, and those whose
    keys are all at or before its first row and below kv_len (ints or traced scalars)."""
    pages = jnp.minimum(n_pages, (jnp.minimum(kv_len, pos + block_q) + G - 1) // G)
    return pages, jnp.minimum(jnp.minimum(pos + 1, kv_len) // G, pages)


def _kernel(meta_ref, table_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, q_bar, k_bar,
            v_bar, free_bar, *, sm_scale, R, G, cfg, num_blocks, k_page_offset, v_page_offset, max_page,
            interpret):
    # meta_ref [NB, 4] int32 (GMEM): block_table's rows
    # table_ref [S, pages_per_seq] int32 (GMEM): page ids
    # q_ref / o_ref [NB * cfg.rows, N, H] (GMEM): queries / outputs in block layout
    # k_ref / v_ref [P, G, K, H] (GMEM): the pool
    # q_smem [compute_wgs, block_q, H]; k_smem / v_smem [num_slots, G, H]
    # barriers: q [compute_wgs]; k / v [num_slots] (a page landed); free_bar [num_slots]
    #   (warp_specialized: every compute warpgroup is done with the slot's page; else None)
    h = lax.axis_index("heads")
    blk = num_blocks - 1 - lax.axis_index("blocks")     # later blocks (more pages) start first
    kv_head = lax.div(h, jnp.int32(R))
    seq = meta_ref[blk, 0]
    pos0 = meta_ref[blk, 1]
    kv_len = meta_ref[blk, 2]
    n_pages = meta_ref[blk, 3]
    bq, slots = cfg.block_q, cfg.num_slots
    H = q_smem.shape[-1]
    dtype = q_smem.dtype
    # register layouts (wgmma's); Mosaic GPU's interpreter runs without them
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def fetch(step, slot):
        page = jnp.minimum(jnp.maximum(table_ref[seq, step], 0), max_page)
        plgpu.copy_gmem_to_smem(k_ref.at[page + k_page_offset, :, kv_head], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[page + v_page_offset, :, kv_head], v_smem.at[slot], v_bar.at[slot])

    def first_fetches():
        for s in range(slots):
            pl.when(s < n_pages)(functools.partial(fetch, s, s))

    def compute(wg, release):
        """One compute warpgroup: rows [wg * bq, (wg + 1) * bq) of the block; release(step, slot)
        after each page it is done with (every page of the block, computed or not)."""
        rows = pl.ds(blk * cfg.rows + wg * bq, bq)
        q_tile = q_smem.at[wg]
        pos = pos0 + wg * bq                                    # its first row's position
        pages, free = warpgroup_pages(pos, kv_len, n_pages, bq, G)
        plgpu.copy_gmem_to_smem(q_ref.at[rows, h], q_tile, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        def step_fn(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(k_bar.at[slot])

            def qk_scope(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]
            if interpret:       # the interpreter's wgmma takes no transposed operand
                s = lax.dot_general(q_tile[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            else:
                s = pl.run_scoped(qk_scope, plgpu.ACC((bq, G), jnp.float32))
            s = s * (sm_scale * _LOG2E)
            if masked:
                row = cast(lax.broadcasted_iota(jnp.int32, (bq, G), 0), plgpu.Layout.WGMMA)
                col = cast(lax.broadcasted_iota(jnp.int32, (bq, G), 1), plgpu.Layout.WGMMA)
                key = col + step * G
                s = jnp.where((key <= row + pos) & (key < kv_len), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_bar.at[slot])
            if masked:
                @pl.when((step + 1) * G > kv_len)
                def _zero_v_tail():     # slots past kv_len: weight 0, but 0 * NaN is NaN
                    # (with 2 compute warpgroups both write the same zeros)
                    key = cast(lax.broadcasted_iota(jnp.int32, (G, H), 0), plgpu.Layout.WGMMA) + step * G
                    v_smem[slot] = jnp.where(key < kv_len, v_smem[slot], jnp.zeros((G, H), dtype))
                    plgpu.commit_smem()

            def pv_scope(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
                return acc_ref[...]
            if interpret:       # nor an operand in registers
                pv = jnp.dot(p.astype(dtype), v_smem[slot], preferred_element_type=jnp.float32)
            else:
                pv = pl.run_scoped(pv_scope, plgpu.ACC((bq, H), jnp.float32))
            release(step, slot)
            return acc + pv, m_new, l_i

        def skip(step, _):              # a page only a later warpgroup's rows see
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(k_bar.at[slot])     # every phase observed before the slot is reused
            plgpu.barrier_wait(v_bar.at[slot])
            release(step, slot)

        m_i = cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = cast(jnp.full((bq, H), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        carry = lax.fori_loop(0, free, functools.partial(step_fn, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(free, pages, functools.partial(step_fn, masked=True), carry)
        if cfg.warp_specialized:
            lax.fori_loop(pages, n_pages, skip, None)            # the block's later pages
        l_i = jnp.where(l_i == 0.0, 1.0, l_i)                   # a block past the last: no keys
        q_tile[...] = (acc / lax.broadcast_in_dim(l_i, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[rows, h])
        plgpu.wait_smem_to_gmem(0)

    if not cfg.warp_specialized:
        def refill(step, slot):                                 # the slot is free again
            nxt = step + slots
            pl.when(nxt < n_pages)(lambda: fetch(nxt, slot))
        first_fetches()
        compute(0, refill)
        return
    wg = lax.axis_index("wg")

    @pl.when(wg < cfg.compute_wgs)
    def _compute():
        plgpu.set_max_registers(232 if cfg.compute_wgs == 2 else 240, action="increase")
        compute(wg, lambda step, slot: plgpu.barrier_arrive(free_bar.at[slot]))

    @pl.when(wg == cfg.compute_wgs)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")
        first_fetches()

        def next_page(step, _):
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(free_bar.at[slot])
            fetch(step, slot)

        def drain(step, _):             # the last pages' releases: every phase observed
            plgpu.barrier_wait(free_bar.at[lax.rem(step, jnp.int32(slots))])
        lax.fori_loop(slots, n_pages, next_page, None)
        lax.fori_loop(jnp.maximum(n_pages - slots, 0), n_pages, drain, None)


def ragged_paged_attention_mgpu(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP,
                                cu_q_lens_S1, num_seqs, *, sm_scale=None, k_page_offset=0,
                                v_page_offset=0, config: PrefillConfig | None = None, interpret=False):
    """Causal ragged paged attention by the Mosaic GPU kernel (module docstring); raises
    ValueError where `kernel_problem` names something it does not take. interpret=True runs it
    in Mosaic GPU's interpreter (`gpu_interpreter`)."""
    problem = kernel_problem(q_TNH, k_pages_PGKH)
    if problem:
        raise ValueError(f"the mgpu kernel does not take {problem}; use backend='gpu'")
    cfg = config or DEFAULT_CONFIG
    T, N, H = q_TNH.shape
    P, G, K, _ = k_pages_PGKH.shape
    S, pages_per_seq = page_indices_SP.shape
    NB = max_blocks(T, S, cfg.rows)
    if NB > MAX_GRID_Y:
        raise ValueError(f"the mgpu kernel takes at most {MAX_GRID_Y} query blocks of {cfg.rows} rows "
                         f"(CUDA's grid y), got {NB} for {T} tokens over {S} sequences")
    sm_scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    meta, rows, out_rows = block_table(kv_lens_S, cu_q_lens_S1, num_seqs, T=T, G=G, block_q=cfg.rows,
                                       pages_per_seq=pages_per_seq)
    q_blocks = q_TNH[rows]                                        # [NB * rows, N, H]
    tiles = dict(transforms=(plgpu.TilingTransform((8, _SWIZZLE // q_TNH.dtype.itemsize)),
                             plgpu.SwizzleTransform(_SWIZZLE)))
    body = functools.partial(
        _kernel, sm_scale=sm_scale, R=N // K, G=G, cfg=cfg, num_blocks=NB, k_page_offset=int(k_page_offset),
        v_page_offset=int(v_page_offset), max_page=P - 1 - max(int(k_page_offset), int(v_page_offset)),
        interpret=bool(interpret))
    threads = dict(num_threads=cfg.compute_wgs + 1, thread_name="wg") if cfg.warp_specialized else {}
    free_bar = (plgpu.Barrier(num_arrivals=cfg.compute_wgs, num_barriers=cfg.num_slots)
                if cfg.warp_specialized else None)
    out_blocks = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((NB * cfg.rows, N, H), q_TNH.dtype),
        grid=(NB, N),                   # the last axis is CUDA's x, the fastest
        grid_names=("blocks", "heads"),
        scratch_types=[
            plgpu.SMEM((cfg.compute_wgs, cfg.block_q, H), q_TNH.dtype, **tiles),
            plgpu.SMEM((cfg.num_slots, G, H), q_TNH.dtype, **tiles),
            plgpu.SMEM((cfg.num_slots, G, H), q_TNH.dtype, **tiles),
            plgpu.Barrier(num_barriers=cfg.compute_wgs),
            plgpu.Barrier(num_barriers=cfg.num_slots),
            plgpu.Barrier(num_barriers=cfg.num_slots),
            free_bar,
        ],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gpu_interpreter() if interpret else None,
        **threads,
    )(meta, page_indices_SP, q_blocks, k_pages_PGKH, v_pages_PGKH)
    valid_T = jnp.arange(T, dtype=jnp.int32) < cu_q_lens_S1[jnp.reshape(num_seqs, ())]
    return jnp.where(valid_T[:, None, None], out_blocks[out_rows], 0).astype(q_TNH.dtype)
