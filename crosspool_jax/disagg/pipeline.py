"""The disaggregated step: all layers of one ragged step as ONE program over KV and weight devices.

`disagg_step(arena, inputs, *, layout, config, num_microbatches)` runs inside `jax.shard_map`
over the 1D mesh axis "dev" (KV devices first, then weight devices; layout.py). Each device
sees its own arena row and its role (`axis_index("dev") < n_kv`). KV devices own sequences
(data-parallel: a sequence's pages are on its home KV device, the one holding its model's
attention side) and run embedding, attention (K/V written into their local pages,
`ragged_paged_attention` over them), each layer's FFN input (its norm and router logits,
`_ffn_in`: those weights sit with the attention side, once per model) and the final norm and
lm head; weight devices run each layer's FFN for all KV devices' tokens with their shard only
(a MoE layer: their experts / block of F; a dense layer: their block of F; which one by the
model's static kind table, `_ffn_partial`). A layer's halves are the placed path's own
(`models.transformer`: `qkv_projection`, the attention options `attention_options` +
`layer_attention_options`, `output_projection`, `ffn_input`, `ffn_output`), so every family
runs here as there: MLA's absorbed attention over its latent + rope key rows (K = 1),
GPT-OSS's sinks, per-layer windows (traced with the layer), biases and clamped SwiGLU.
Hidden states cross between the roles by an exchange that every device executes
(collectives stay outside the role `lax.cond`s):

    to_weights(p)   FFN inputs [x | router logits] of every KV device -> every weight device's inbox
    to_kv(y)        weight devices' partial FFN outputs, summed, tokens of KV device k -> k

By default (`exchange="p2p"`) each direction is max(n_kv, n_w) rounds of `ppermute` over
KV x weight pairs (`p2p_rounds`), so only the payload moves; `exchange="collective"` is one
all_gather + one psum_scatter over the whole axis (also moves KV->KV copies and zeros).

Ping-pong schedule (M=2): each KV device's batch is split into micro-batches A and B.
Attention of (layer i, micro-batch m) runs at stage 2i+m, its FFN at stage 2i+m+1; the
stages are one `lax.scan` of 2L+1 steps, each ending with one exchange in both directions.
For L=2:

    stage          0       1       2       3       4
    KV pool        attn0A  attn0B  attn1A  attn1B  -
    weights pool   -       ffn0A   ffn0B   ffn1A   ffn1B
    exchange       h of this stage's attention -> weights; y of this stage's FFN -> KV

so while the weights pool runs A's FFN, the KV pool runs B's attention. With M=1 (no
overlap, the baseline) a stage is one layer: attention, exchange to the weights pool, FFN,
exchange back (a scan of L steps; each pool idles while the other computes).

The arena is donated: K/V are scattered straight into the carried row (viewed as
[rows, kv_cache_row]; pages sit at the row's start), so the pool is updated in place.

No `lax.cond` per stage: on a GPU a conditional reads its predicate back to the host, which
stalls the host until the device has caught up, once per cond (measured on two H200s: the
dispatch of a 2-layer step took the whole step, ~8 ms). Every device runs both roles' code
each stage and the data switches the idle role off: its K/V writes go to dropped slots, its
attention sees num_seqs = 0 (the kernel does no work), its expert groups are all empty (the
grouped matmuls read no expert), and its outputs are replaced by zeros with `where` (never
multiplied: what an idle device computes from the other role's bytes may be NaN). What an
idle device still does: the q/k/v and o projections and the FFN input's norm and router
(weight devices, on their own row's bytes), any dense or shared-expert matmul (KV devices). A model mixing FFN
kinds keeps one `lax.switch` per layer. The final logits are computed on every device too
(the weight devices' rows are dropped).

Multi-step decode (`disagg_decode`): the same forward (`_device_program`'s `run`) called
num_steps times in a `fori_loop` on a pure-decode batch, sampling on the KV devices and the
sampled tokens fed back, so a dispatch (and its host work) serves num_steps tokens.

Sequence-sharded variant (`sharded_pages` given: some sequence's pages lie on several
devices; a different program, the common case keeps the one above). Each sequence's tokens
belong to its home KV device (q/k/v, residual, FFN exchange and logits as above). Per stage
the q/k/v of every KV device's tokens are all-gathered (every device runs it; weight devices
pass zeros), EVERY device (a weight device's row holds pages too: a long request spills
there) writes the K/V of the tokens whose page is local and computes the partial attention
of ALL gathered tokens over its local pages (`sharded_attention`), the partials are merged
by log-sum-exp (pmax + psum over the axis), and each home takes its tokens' rows, joins its
model's attention sinks to them (`sharded_attention.with_sinks`) and runs the o projection.

Kernels: `attention_backend` / `moe_backend` (static) reach `ragged_paged_attention` (the
unsharded attention) and `fused_moe` (over the device's experts); "auto" is the
GPU/TPU kernel on that platform where its shapes allow and the jnp reference elsewhere (on
CPU nothing changes); the projections, routers and dense matrices run on `moe_backend`'s
matmul kernel (`models.transformer._matmul`). Their weight and page operands are the WHOLE
arena row viewed as pages (`layout.kernel_pages`, with the K/V page offsets) or as a stack's
rows (`layout.layer_rows`: expert stacks and stacked matrices), never a slice of it: a custom
call's operand is a whole buffer, so a slice would be copied into every call. The sharded
partial attention is jnp only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from crosspool_jax.disagg import sharded_attention
from crosspool_jax.disagg.inputs import ShardedPages
from crosspool_jax.disagg.layout import AXIS, ArenaLayout
from crosspool_jax.kv.pool import page_view, token_slots
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.transformer import (attention_options, compute_logits, ffn_input, ffn_output,
                                              layer_attention_options, output_projection, qkv_projection,
                                              reads_in_place, rms_norm)
from crosspool_jax.runtime import sampler as sampler_lib
from crosspool_jax.runtime.packed_arrays import PackedArrays, unpacked
from crosspool_jax.runtime.step_inputs import StepInputs
from pallas_kernels.ragged_paged_attention import ragged_paged_attention



def num_stages(num_layers: int, num_microbatches: int) -> int:
    """Stages of the scan: L with one micro-batch, M*L + 1 with M >= 2 (ping-pong)."""
    _check_microbatches(num_microbatches)
    return num_layers if num_microbatches == 1 else num_microbatches * num_layers + 1


def _check_microbatches(num_microbatches) -> None:
    if not isinstance(num_microbatches, (int, np.integer)) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")


def schedule(num_layers: int, num_microbatches: int) -> list[tuple]:
    """[(stage, attention (layer, mb) or None, ffn (layer, mb) or None)] -- the host-side table.

    With one micro-batch a stage runs attention, then the FFN of the same layer, in sequence;
    with M >= 2, stage t runs the attention of (t // M, t % M) and the FFN of the previous
    stage's attention."""
    M = num_microbatches
    if M == 1:
        return [(i, (i, 0), (i, 0)) for i in range(num_layers)]
    out = []
    for t in range(num_stages(num_layers, M)):
        a = divmod(t, M) if t < M * num_layers else None
        f = divmod(t - 1, M) if t >= 1 else None
        out.append((t, a, f))
    return out


def _write_kv_rows(row_X, layout: ArenaLayout, config: ModelConfig, k_TKH, v_TKH, slots_T):
    """Scatter the new tokens' K/V into the row's pages; slots outside [0, P*G) are dropped.
    k/v are what the pool caches per token (`config.kv_cache_row` each: per-head K and V, or
    MLA's latent + rope key row in two halves)."""
    KH = config.kv_cache_row
    rows = layout.arena_elems // KH
    PG = layout.pages_per_device * layout.tokens_per_page
    k_base = layout.slot("kv", "pages/k_PX").offset // KH
    v_base = layout.slot("kv", "pages/v_PX").offset // KH
    valid_T = (slots_T >= 0) & (slots_T < PG)
    idx = jnp.concatenate([jnp.where(valid_T, k_base + slots_T, rows),
                           jnp.where(valid_T, v_base + slots_T, rows)])
    T = k_TKH.shape[0]
    new = jnp.concatenate([k_TKH.reshape(T, KH), v_TKH.reshape(T, KH)]).astype(row_X.dtype)
    return row_X.reshape(rows, KH).at[idx].set(new, mode="drop").reshape(-1)


def _layer_attn_params(row_X, layer, layout: ArenaLayout) -> dict:
    names = [s.name for s in layout.kv_slots if s.name.startswith("attn/")]
    return {n[len("attn/"):]: _layer_leaf(row_X, "kv", n, layer, layout) for n in names}


def _layer_leaf(row_X, role: str, name: str, index, layout: ArenaLayout):
    """Entry `index` of the role's stack `name`: its rows in place (`layout.layer_rows`) for a
    matrix or expert stack (`reads_in_place`), else a slice of the row."""
    if reads_in_place(name, layout.slot(role, name).shape):
        return layout.layer_rows(row_X, role, name, index)
    return layout.view(row_X, role, name)[index]


def _qkv(row_X, x_TD, positions_T, layer, layout: ArenaLayout, config: ModelConfig, backend: str):
    """KV device: q/k/v of one layer (norms, RoPE)."""
    return qkv_projection(_layer_attn_params(row_X, layer, layout), config, x_TD, positions_T,
                          matmul_backend=backend)


def _pages(row_X, layout: ArenaLayout, config: ModelConfig):
    """(k_pages, v_pages) [P, G, K, H]: this model's view of the row's local pages (K, H: the
    pool's `kv_cache_heads`, `kv_cache_head_dim`)."""
    c = config
    return tuple(page_view(layout.view(row_X, "kv", n), c.kv_cache_heads, c.kv_cache_head_dim)
                 for n in ("pages/k_PX", "pages/v_PX"))


def _o_proj(row_X, x_TD, out_TNH, layer, layout: ArenaLayout, config: ModelConfig, backend: str):
    """`models.output_projection` of the layer (MLA: W_uv first; GPT-OSS: the o bias)."""
    return output_projection(_layer_attn_params(row_X, layer, layout), config, x_TD, out_TNH,
                             matmul_backend=backend)


def _attention_options(row_X, layer, layout: ArenaLayout, config: ModelConfig) -> dict:
    """The layer's attention options as the placed step passes them: `models.attention_options`
    (scale, a window common to all layers, MLA's latent value width) with the layer's own
    (`models.layer_attention_options`: sinks, a per-layer window, traced with the layer)."""
    return {**attention_options(config),
            **layer_attention_options(_layer_attn_params(row_X, layer, layout), config, layer)}


def _attend(row_X, x_TD, q_TNH, step: StepInputs, layer, layout: ArenaLayout, config: ModelConfig,
            backend: str, matmul_backend: str):
    """KV device: attention over the local pages (new K/V already written), o projection, residual."""
    c = config
    # the whole row as pages + where K and V start: a sliced pages region would be copied into the call
    pages, k0, v0 = layout.kernel_pages(row_X, c.kv_cache_heads, c.kv_cache_head_dim)
    out_TNH = ragged_paged_attention(q_TNH, pages, pages, step.kv_lens_S, step.page_indices_LSP[layer],
                                     step.cu_q_lens_S1, step.num_seqs_1, backend=backend, k_page_offset=k0,
                                     v_page_offset=v0, **_attention_options(row_X, layer, layout, c))
    return _o_proj(row_X, x_TD, out_TNH, layer, layout, c, matmul_backend)


def _kind_tables(config: ModelConfig):
    """(kind index, index into its stack) int32 [L] tables of a model mixing FFN kinds."""
    L, kinds = config.num_layers, config.ffn_kinds
    return (jnp.asarray([kinds.index(config.ffn_kind(l)) for l in range(L)], jnp.int32),
            jnp.asarray([config.ffn_index(l) for l in range(L)], jnp.int32))


def payload_width(config: ModelConfig) -> int:
    """Width of the hidden state sent to the weight devices: the FFN input x [T, D] and, for a
    model with MoE layers, the router logits [T, E] beside it."""
    return config.hidden_size + (config.num_experts if "moe" in config.ffn_kinds else 0)


def _ffn_in(row_X, h_TD, layer, layout: ArenaLayout, config: ModelConfig, backend: str):
    """KV device: layer `layer`'s FFN input as sent to the weight devices, [T, payload_width]
    in h's dtype: the normed x and the router logits (`models.ffn_input`; the norms and routers
    sit in the KV rows, once per model, not on every weight device). A model mixing kinds
    picks its stack under one `lax.switch` (dense layers send zero logits)."""
    c, dtype = config, h_TD.dtype
    E = payload_width(c) - c.hidden_size

    def payload(kind, index, h):
        p = {s.name[len(kind) + 1:]: _layer_leaf(row_X, "kv", s.name, index, layout)
             for s in layout.kv_slots if s.name.startswith(f"{kind}/")}
        x_TD, logits_TE = ffn_input(p, c, kind, h, matmul_backend=backend)
        if not E:
            return x_TD.astype(dtype)
        if logits_TE is None:
            logits_TE = jnp.zeros((h.shape[0], E), dtype)
        return jnp.concatenate([x_TD.astype(dtype), logits_TE.astype(dtype)], axis=-1)

    kinds = c.ffn_kinds
    if len(kinds) == 1:
        return payload(kinds[0], layer, h_TD)
    kind_L, index_L = _kind_tables(c)
    return jax.lax.switch(kind_L[layer], [functools.partial(payload, k, index_L[layer]) for k in kinds], h_TD)


def _ffn_partial(row_X, inbox_TX, layer, w_index, layout: ArenaLayout, config: ModelConfig, backend: str = "reference",
                 on=True, token_mask_T=None):
    """Weight device: this device's share of layer `layer`'s FFN output (no residual), float32,
    from the KV devices' payload (`_ffn_in`: x and router logits); the sum over the weight
    devices is the full FFN output. `on` False (traced): no expert is read (empty groups); the
    caller discards the output. token_mask_T: the inbox's real tokens (padding reads no expert).

    A model with one FFN kind reads that stack at `layer` (a MoE-only model compiles exactly as
    without dense support); a model mixing kinds picks the branch and the index into its stack
    by two small static int32 tables indexed with the traced layer (`config.ffn_kind`,
    `config.ffn_index`) under one `lax.switch`, which only reads the arena row (never returns it).
    """
    c = config
    kinds = c.ffn_kinds
    if len(kinds) == 1:
        return _ffn_shard(row_X, inbox_TX, layer, w_index, layout, c, backend, on, token_mask_T, kind=kinds[0])
    kind_L, index_L = _kind_tables(c)
    index = index_L[layer]
    branches = [functools.partial(_ffn_shard, row_X, index=index, w_index=w_index, layout=layout, config=c,
                                  backend=backend, on=on, token_mask_T=token_mask_T, kind=k) for k in kinds]
    return jax.lax.switch(kind_L[layer], branches, inbox_TX)


def _stack_params(row_X, kind: str, index, layout: ArenaLayout) -> dict:
    """The weight row's `kind` ("moe" / "dense") leaves of one layer: entry `index` of each stack
    (`_layer_leaf`: the matrices and expert stacks in place)."""
    prefix = f"{kind}/"
    return {s.name[len(prefix):]: _layer_leaf(row_X, "w", s.name, index, layout)
            for s in layout.w_slots if s.name.startswith(prefix)}


def _ffn_shard(row_X, inbox_TX, index, w_index, layout: ArenaLayout, config: ModelConfig, backend: str, on,
               token_mask_T=None, *, kind: str):
    """Weight device: its share of layer `index` of the model's `kind` stack, float32
    (`models.ffn_output` on the row's shards: its experts, or its block of F of a dense layer
    and of a shared expert) of the payload [x | router logits]. Matrices and expert stacks are
    read in place (`_stack_params`). `on` False: the expert offset points past the experts, so no
    expert is read."""
    c, D = config, config.hidden_size
    p = _stack_params(row_X, kind, index, layout)
    x_TD, logits_TE = inbox_TX[:, :D], (inbox_TX[:, D:] if kind == "moe" else None)
    offset = None
    if kind == "moe":
        E_loc = p["w1_LEDF2"].shape[0]
        offset = jnp.where(on, (w_index // layout.tp) * E_loc, c.num_experts)
    return ffn_output(p, c, kind, x_TD, logits_TE, moe_backend=backend, expert_offset=offset,
                      token_mask_T=token_mask_T)


def p2p_rounds(n_kv: int, n_w: int) -> list[list[tuple]]:
    """Rounds of (kv, w) pairs covering every KV x weight device pair once, each device at most
    once per round: round r pairs kv k with weight w = (k + r) mod max(n_kv, n_w)."""
    m = max(n_kv, n_w)
    return [[(k, (k + r) % m) for k in range(n_kv) if (k + r) % m < n_w] for r in range(m)]


def collective_exchange(layout: ArenaLayout, d, Tm: int, D: int):
    """One all_gather and one psum_scatter over the whole axis per direction (simpler than p2p;
    also moves KV->KV copies and the idle role's zeros). Returns (to_weights, to_kv) as
    `p2p_exchange` does."""
    n_kv, n_w = layout.n_kv, layout.n_w

    def to_weights(h_TX):
        return jax.lax.all_gather(h_TX, AXIS)[:n_kv].reshape(n_kv * Tm, h_TX.shape[-1])

    def to_kv(y_TD):
        y_NTD = jnp.concatenate([y_TD.reshape(n_kv, Tm, D), jnp.zeros((n_w, Tm, D), y_TD.dtype)])
        return jax.lax.psum_scatter(y_NTD, AXIS, scatter_dimension=0, tiled=True)[0]
    return to_weights, to_kv


def p2p_exchange(layout: ArenaLayout, d, Tm: int, D: int):
    """(to_weights(h_TX) -> inbox [n_kv*Tm, X] on weight devices (X: the payload's width),
        to_kv(y_TD [n_kv*Tm, D]) -> summed FFN output [Tm, D] on KV devices) for device d.

    max(n_kv, n_w) rounds of `ppermute` per direction (`p2p_rounds`); only KV<->weight pairs
    move data, exactly the payload.
    """
    n_kv, n_w = layout.n_kv, layout.n_w
    rounds = p2p_rounds(n_kv, n_w)
    m, w = len(rounds), d - n_kv

    def to_weights(h_TD):
        inbox_KTD = jnp.zeros((n_kv, Tm, h_TD.shape[-1]), h_TD.dtype)
        for r, pairs in enumerate(rounds):
            got_TD = jax.lax.ppermute(h_TD, AXIS, perm=[(k, n_kv + j) for k, j in pairs])
            k_src = (w - r) % m                                  # who sent to weight device w
            put = jax.lax.dynamic_update_index_in_dim(inbox_KTD, got_TD, jnp.clip(k_src, 0, n_kv - 1), 0)
            inbox_KTD = jnp.where((w >= 0) & (k_src < n_kv), put, inbox_KTD)
        return inbox_KTD.reshape(n_kv * Tm, h_TD.shape[-1])

    def to_kv(y_TD):
        y_KTD = y_TD.reshape(n_kv, Tm, D)
        acc_TD = jnp.zeros((Tm, D), jnp.float32)
        for r, pairs in enumerate(rounds):
            k_dst = jnp.clip((w - r) % m, 0, n_kv - 1)
            chunk_TD = jax.lax.dynamic_index_in_dim(y_KTD, k_dst, 0, keepdims=False)
            acc_TD = acc_TD + jax.lax.ppermute(chunk_TD, AXIS, perm=[(n_kv + j, k) for k, j in pairs])
        return acc_TD.astype(y_TD.dtype)
    return to_weights, to_kv


# exchange name -> factory (layout, device index, tokens per micro-batch, D) -> (to_weights, to_kv)
EXCHANGES = {"p2p": p2p_exchange, "collective": collective_exchange}


def exchange_factory(exchange):
    """The exchange factory of `exchange`: a name of EXCHANGES, or a factory with the same
    signature (a benchmark passes its own, e.g. `disagg.report.no_exchange`)."""
    if callable(exchange):
        return exchange
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {tuple(EXCHANGES)} or an exchange factory, got {exchange!r}")
    return EXCHANGES[exchange]


def _device_program(arena_1X, inputs: StepInputs, sharded: ShardedPages | None, offsets_MX, *,
                    layout: ArenaLayout, config: ModelConfig, M: int, exchange, attention_backend: str,
                    moe_backend: str):
    """(kv_index, mine, run): this device's KV index, its step inputs `mine` (leaves [M, ...];
    a weight device gets the last KV device's) and `run(row_X, step) -> (row_X, logits [M*S, V])`,
    one forward of step inputs shaped like `mine` through every layer, K/V written in place.
    offsets_MX: where the model's tensors sit (`ArenaLayout.offsets`): None (`layout`'s own),
    int32 [len(own_slots)] (one model, every micro-batch), or int32 [M, len(own_slots)] (lanes:
    micro-batch m is a model of this architecture at offsets_MX[m]; m traced ok)."""
    lanes = offsets_MX is not None and offsets_MX.ndim == 2

    def lay(m):
        """Micro-batch m's model: the layout bound to its offsets."""
        return layout.bind(offsets_MX[m] if lanes else offsets_MX)

    c = config
    n_kv = layout.n_kv
    dtype = arena_1X.dtype
    d = jax.lax.axis_index(AXIS)
    is_kv = d < n_kv
    kv_index = jnp.minimum(d, n_kv - 1)
    Tm, D, L = inputs.token_ids_T.shape[2], c.hidden_size, c.num_layers
    to_weights, to_kv = exchange_factory(exchange)(layout, d, Tm, D)

    def run(row_X, mine):
        if lanes:
            x_MTD = jnp.stack([lay(m).view(row_X, "kv", "embed/embedding_VD")[mine.token_ids_T[m]] for m in range(M)])
        else:
            x_MTD = lay(0).view(row_X, "kv", "embed/embedding_VD")[mine.token_ids_T]
        x_MTD = jnp.where(is_kv, x_MTD, 0).astype(dtype)

        def attention(row_X, x_MTD, m, layer, on, pages_on):
            """(h_TD, row): KV device's attention of micro-batch m (zeros and no write when off)."""
            step = jax.tree_util.tree_map(lambda a: a[m], mine)
            x_TD = x_MTD[m]
            layout = lay(m)
            # in place on the carried row; an idle device drops every write. Every read of the row
            # before the write must feed the write (else XLA cannot order it first and copies the
            # whole row): k/v come from the row as it was, q from the written row (same weights).
            _, k_TKH, v_TKH = _qkv(row_X, x_TD, step.positions_T, layer, layout, c, moe_backend)
            row_X = _write_kv_rows(row_X, layout, c, k_TKH, v_TKH, jnp.where(on, step.slots_LT[layer], -1))
            q_TNH, _, _ = _qkv(row_X, x_TD, step.positions_T, layer, layout, c, moe_backend)
            live = step.replace(num_seqs_1=jnp.where(on, step.num_seqs_1, 0))   # off: no attention work
            h_TD = _attend(row_X, x_TD, q_TNH, live, layer, layout, c, attention_backend, moe_backend)
            return jnp.where(on, h_TD, jnp.zeros_like(h_TD)), row_X

        def attention_sharded(row_X, x_MTD, m, layer, on, pages_on):
            """`attention` when sequences span devices: gathered q/k/v, local writes and partial
            attention over the local pages on EVERY device holding pages (`pages_on`: this
            stage attends; weight devices too), log-sum-exp merge; collectives outside the conds."""
            step = jax.tree_util.tree_map(lambda a: a[m], mine)
            x_TD = x_MTD[m]
            layout = lay(m)
            qkv = lambda x: _qkv(row_X, x, step.positions_T, layer, layout, c, moe_backend)   # noqa: E731
            zeros = lambda x: tuple(jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(qkv, x))   # noqa: E731
            qkv_TXH = jax.lax.cond(on, qkv, zeros, x_TD)
            q_all, k_all, v_all = (jax.lax.all_gather(a, AXIS)[:n_kv].reshape(n_kv * Tm, *a.shape[1:])
                                   for a in qkv_TXH)
            pages = jax.tree_util.tree_map(lambda a: a[d, m], (sharded.slots_LT, sharded.pages_LSB,
                                                               sharded.blocks_SB))
            slots_LT, pages_LSB, blocks_SB = pages
            row_X = _write_kv_rows(row_X, layout, c, k_all, v_all, jnp.where(pages_on, slots_LT[layer], -1))
            # the sinks are the model's (valid on its homes, which own the tokens): applied after the merge
            opts = _attention_options(row_X, layer, layout, c)
            sinks_N = opts.pop("sinks", None)

            def partial(q_TNH):
                k_pages, v_pages = _pages(row_X, layout, c)
                return sharded_attention.partial_paged_attention(
                    q_TNH, k_pages, v_pages, inputs.positions_T[:, m].reshape(-1), sharded.seq_T[m],
                    inputs.kv_lens_S[:, m].reshape(-1), pages_LSB[layer], blocks_SB, **opts)

            def empty(q_TNH):
                out, lse = jax.eval_shape(partial, q_TNH)
                return jnp.zeros(out.shape, out.dtype), jnp.full(lse.shape, sharded_attention.EMPTY_LSE, lse.dtype)

            out_TNH, lse_TN = jax.lax.cond(pages_on, partial, empty, q_all)
            merged_TNH, merged_lse_TN = sharded_attention.merge_over_axis(out_TNH, lse_TN, AXIS, return_lse=True)
            own = lambda a: jax.lax.dynamic_slice_in_dim(a, kv_index * Tm, Tm)   # noqa: E731  this home's rows
            mine_TNH = sharded_attention.with_sinks(own(merged_TNH), own(merged_lse_TN), sinks_N).astype(dtype)
            return jax.lax.cond(on, lambda o: _o_proj(row_X, x_TD, o, layer, layout, c, moe_backend),
                                lambda o: jnp.zeros((Tm, D), dtype), mine_TNH), row_X

        attend = attention if sharded is None else attention_sharded

        # the real tokens of every KV device's micro-batches (inputs are replicated): the
        # weight devices route the padding of their inbox to no expert
        ends_NM1 = jnp.take_along_axis(inputs.cu_q_lens_S1, inputs.num_seqs_1, axis=2)
        real_NMT = jnp.arange(Tm, dtype=jnp.int32)[None, None, :] < ends_NM1

        def ffn(row_X, inbox_TD, layer, on, m):
            mask_T = jnp.moveaxis(real_NMT, 1, 0)[m].reshape(n_kv * Tm)
            y_TD = _ffn_partial(row_X, inbox_TD, layer, d - n_kv, lay(m), c, moe_backend, on,
                                token_mask_T=mask_T).astype(dtype)
            return jnp.where(on, y_TD, jnp.zeros_like(y_TD))

        if M == 1:
            def stage(carry, layer):
                x_MTD, row_X = carry
                h_TD, row_X = attend(row_X, x_MTD, 0, layer, is_kv, True)
                inbox_TD = to_weights(_ffn_in(row_X, h_TD, layer, lay(0), c, moe_backend))
                y_TD = to_kv(ffn(row_X, inbox_TD, layer, ~is_kv, 0))
                return (jnp.where(is_kv, (h_TD + y_TD)[None], x_MTD), row_X), None

            (x_MTD, row_X), _ = jax.lax.scan(stage, (x_MTD, row_X), jnp.arange(L, dtype=jnp.int32))
        else:
            def stage(carry, t):
                x_MTD, inbox_TD, row_X = carry
                m_a, i_a = t % M, jnp.minimum(t // M, L - 1)
                attn_on = is_kv & (t < M * L)
                m_f, i_f = (t + M - 1) % M, jnp.maximum(t - 1, 0) // M
                ffn_on = t >= 1
                h_TD, row_X = attend(row_X, x_MTD, m_a, i_a, attn_on, t < M * L)
                y_TD = ffn(row_X, inbox_TD, i_f, (~is_kv) & ffn_on, m_f)
                # the exchange: every device runs it
                inbox_TD = to_weights(_ffn_in(row_X, h_TD, i_a, lay(m_a), c, moe_backend))
                y_back_TD = to_kv(y_TD)
                x_MTD = jnp.where(attn_on, x_MTD.at[m_a].set(h_TD), x_MTD)
                x_MTD = jnp.where(is_kv & ffn_on, x_MTD.at[m_f].add(y_back_TD), x_MTD)
                return (x_MTD, inbox_TD, row_X), None

            carry = (x_MTD, jnp.zeros((n_kv * Tm, payload_width(c)), dtype), row_X)
            (x_MTD, _, row_X), _ = jax.lax.scan(stage, carry, jnp.arange(num_stages(L, M), dtype=jnp.int32))

        last_MSD = jnp.take_along_axis(x_MTD, mine.logits_indices_S[:, :, None], axis=1)

        def logits(layout, last_SD):
            """Logits [S, V] of last_SD through the model's final norm and lm head."""
            hidden = rms_norm(last_SD, layout.view(row_X, "kv", "final/norm_D"), c.rms_norm_eps)
            kv_params = {"embed": {"embedding_VD": layout.view(row_X, "kv", "embed/embedding_VD")}, "final": {}}
            if layout.has("kv", "final/lm_head_DV"):
                kv_params["final"]["lm_head_DV"] = layout.view(row_X, "kv", "final/lm_head_DV")
            return compute_logits(kv_params, c, hidden)

        # every device computes them (a cond here would make the host wait for the whole step);
        # the weight devices' rows are garbage and dropped by the caller ([:n_kv]). One model's
        # micro-batches share one lm head call; lanes take one each.
        if lanes:
            return row_X, jnp.concatenate([logits(lay(m), last_MSD[m]) for m in range(M)])
        return row_X, logits(lay(0), last_MSD.reshape(-1, D))

    return kv_index, jax.tree_util.tree_map(lambda a: a[kv_index], inputs), run


def _device_step(arena_1X, inputs: StepInputs, sharded: ShardedPages | None, offsets, **kw):
    _, mine, run = _device_program(arena_1X, inputs, sharded, offsets, **kw)
    row_X, logits_RV = run(arena_1X[0], mine)
    return row_X[None], logits_RV[None]


def _checked_inputs(inputs, layout: ArenaLayout, exchange, num_microbatches: int, offsets) -> StepInputs:
    """The step inputs (unpacked from a PackedArrays: one host->device transfer) after the checks
    `disagg_step` and `disagg_decode` share."""
    inputs = unpacked(inputs)
    exchange_factory(exchange)
    _check_microbatches(num_microbatches)
    if inputs.token_ids_T.shape[:2] != (layout.n_kv, num_microbatches):
        raise ValueError(f"inputs lead with {inputs.token_ids_T.shape[:2]}, expected "
                         f"(n_kv, num_microbatches) = ({layout.n_kv}, {num_microbatches})")
    n = len(layout.own_slots)
    if offsets is not None and tuple(offsets.shape) not in ((n,), (num_microbatches, n)):
        raise ValueError(f"offsets have shape {tuple(offsets.shape)}, expected ({n},) (one model) or "
                         f"({num_microbatches}, {n}) (a model per micro-batch): `ArenaLayout.offsets`")
    return inputs


def _decode_inputs(mine: StepInputs, allowance_MT, j, *, num_pages: int, G: int) -> StepInputs:
    """Decode step j (traced) of a pure-decode batch whose step 0 is `mine` (leaves [M, ...]):
    token t is sequence t's one new token, so positions, context lengths and slots move on
    by j, the slots looked up in the (pre-allocated) page tables; padding, and a sequence
    past its allowance (the steps its pages cover), write nothing."""
    M, T = mine.token_ids_T.shape
    S = mine.kv_lens_S.shape[1]
    t = jnp.arange(T, dtype=jnp.int32)
    live_MT = (t[None, :] < mine.num_seqs_1) & (j < allowance_MT)             # [M, T]
    pos_MT = mine.positions_T + j
    slots = functools.partial(token_slots, tokens_per_page=G, num_pages=num_pages)
    slots_MLT = jax.vmap(slots, in_axes=(0, None, 0, 0))(mine.page_indices_LSP, jnp.minimum(t, S - 1), pos_MT,
                                                        live_MT)
    live_MS = jnp.arange(S, dtype=jnp.int32)[None, :] < mine.num_seqs_1
    return mine.replace(positions_T=pos_MT, slots_LT=slots_MLT,
                        kv_lens_S=jnp.where(live_MS, mine.kv_lens_S + j, mine.kv_lens_S))


def _device_decode(arena_1X, inputs: StepInputs, offsets, allowance_NMT, meta, counts_RV, prompt_mask_RV, *,
                   num_steps: int, num_logprobs: int, all_greedy: bool, **kw):
    """num_steps decode tokens in one program: forward, sample on the device (rows of this KV
    device: meta leaves [n_kv * M*S, ...], this device's slice), feed the tokens back."""
    kv_index, mine, run = _device_program(arena_1X, inputs, None, offsets, **kw)
    layout, config = kw["layout"], kw["config"]
    M, T = mine.token_ids_T.shape
    S = mine.kv_lens_S.shape[1]
    R = M * S

    def rows(a):
        return None if a is None else jax.lax.dynamic_slice_in_dim(a, kv_index * R, R)

    meta_R = jax.tree_util.tree_map(rows, meta)
    counts_R, mask_R = rows(counts_RV), rows(prompt_mask_RV)
    out_buf = sampler_lib.empty_outputs(num_steps, R, config.vocab_size, meta_R, counts_R, mask_R,
                                        num_logprobs=num_logprobs)

    def body(j, carry):
        row_X, tokens_MT, counts, out_buf = carry
        step = _decode_inputs(mine, allowance_NMT[kv_index], j, num_pages=layout.pages_per_device,
                              G=layout.tokens_per_page).replace(token_ids_T=tokens_MT)
        row_X, logits_RV = run(row_X, step)
        out = sampler_lib.sample(logits_RV, sampler_lib.advance_metadata(meta_R, j), counts, mask_R,
                                 num_logprobs=num_logprobs, all_greedy=all_greedy)
        out_buf = jax.tree_util.tree_map(lambda b, x: b.at[j].set(x), out_buf, out)
        if counts is not None:
            counts = sampler_lib.update_counts(counts, out.token_ids_S)
        new_MS = out.token_ids_S.reshape(M, S)[:, :min(S, T)]
        tokens_MT = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(tokens_MT), new_MS, 0, axis=1)
        return row_X, tokens_MT, counts, out_buf

    # a fixed trip count: no host round trip per token (a data-dependent while would read its
    # predicate back every iteration); rows that hit a stop keep decoding into their own pages
    # and the host drops their extra tokens
    row_X, _, _, out_buf = jax.lax.fori_loop(0, num_steps, body, (arena_1X[0], mine.token_ids_T, counts_R, out_buf))
    return row_X[None], jax.tree_util.tree_map(lambda a: a[None], out_buf)


@functools.partial(jax.jit, static_argnames=("layout", "config", "num_microbatches", "num_steps", "num_logprobs",
                                             "all_greedy", "exchange", "attention_backend", "moe_backend"),
                   donate_argnums=0)
def disagg_decode(arena: jax.Array, inputs, allowance_NMT, meta, output_counts_RV=None, prompt_mask_RV=None, *,
                  layout: ArenaLayout, config: ModelConfig, num_microbatches: int, num_steps: int,
                  num_logprobs: int = 0, all_greedy: bool = False, exchange="p2p", attention_backend: str = "auto",
                  moe_backend: str = "auto", offsets=None):
    """`num_steps` decode tokens of a pure-decode batch in ONE program -> (arena, SamplerOutput
    with leaves [n_kv, num_steps, M*S, ...] packed: `PackedArrays` with `lead`, one buffer to
    fetch, each KV device's rows where they were computed).

    inputs: `build_disagg_inputs` of single-token decode chunks (or it packed); allowance_NMT
    int32 [n_kv, M, T]: how many of the num_steps tokens each decode token's sequence may take
    (its page tables hold the pages of those; 0 for padding): a sequence past it writes no K/V.
    meta: `SamplingMetadata` (or it packed) with n_kv * M*S rows in device-row order (device d's row m*S+s is
    its logit row m*S+s); output_counts_RV / prompt_mask_RV: the penalties' history in the same
    rows, or None. Step j samples with `advance_metadata(meta, j)` and feeds the tokens to step
    j + 1; every step runs (no early exit) and the host applies stop rules to what it reads.
    num_logprobs, all_greedy: the sampling variant (`sampler.sample`). Other arguments as
    `disagg_step`.
    """
    inputs = _checked_inputs(inputs, layout, exchange, num_microbatches, offsets)
    meta = unpacked(meta)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    replicated = PartitionSpec()
    fn = jax.shard_map(
        functools.partial(_device_decode, layout=layout, config=config, M=num_microbatches, exchange=exchange,
                          attention_backend=attention_backend, moe_backend=moe_backend, num_steps=num_steps,
                          num_logprobs=num_logprobs, all_greedy=all_greedy),
        mesh=layout.mesh(),
        in_specs=(PartitionSpec(AXIS, None), replicated, replicated, replicated, replicated, replicated,
                  replicated),
        out_specs=(PartitionSpec(AXIS, None), PartitionSpec(AXIS)), check_vma=False)
    arena, out = fn(arena, inputs, offsets, allowance_NMT, meta, output_counts_RV, prompt_mask_RV)
    return arena, PackedArrays.pack_device(jax.tree_util.tree_map(lambda a: a[:layout.n_kv], out), lead=True)


@functools.partial(jax.jit, static_argnames=("layout", "config", "num_microbatches", "exchange",
                                             "attention_backend", "moe_backend"),
                   donate_argnums=0)
def disagg_step(arena: jax.Array, inputs: StepInputs, sharded_pages: ShardedPages | None = None, *,
                layout: ArenaLayout, config: ModelConfig, num_microbatches: int, exchange="p2p",
                attention_backend: str = "auto", moe_backend: str = "auto", offsets=None):
    """One ragged step over the whole model -> (arena, logits float32 [n_kv, M*S, V]).

    arena: `[num_devices, arena_elems]` from `build_arena` (donated; K/V written into it).
    inputs: `StepInputs` with leaves `[n_kv, M, ...]` from `build_disagg_inputs` (or it packed,
    `runtime.packed_arrays.PackedArrays`: one transfer); row m*S+s of
    a KV device's logits is micro-batch m's sequence s (its last new token).
    sharded_pages: None (every sequence's pages on its KV device: the common program) or the
    `build_sharded_pages` view of the same step (sequences spanning KV devices: the
    sequence-sharded program; `inputs`' slots and page tables are then unused).
    exchange: "p2p" (ppermute rounds, payload only), "collective" (all_gather + psum_scatter),
    or an exchange factory (`exchange_factory`).
    attention_backend, moe_backend: the kernels' backends ("auto", "reference", "gpu", "tpu").
    offsets: where the model's tensors sit, `ArenaLayout.offsets` (traced: the program depends on
    `layout.program` only): None (`layout`'s own offsets), int32 [len(own_slots)] (the model of
    every micro-batch; `offsets(bases)` for a model in budgeted slots), or int32 [M, ...]: lanes,
    micro-batch m a model of this architecture at offsets[m] (while the weight devices run one
    lane's FFN, the KV devices attend the next lane's layer).
    """
    inputs = _checked_inputs(inputs, layout, exchange, num_microbatches, offsets)
    fn = jax.shard_map(
        functools.partial(_device_step, layout=layout, config=config, M=num_microbatches,
                          exchange=exchange, attention_backend=attention_backend, moe_backend=moe_backend),
        mesh=layout.mesh(), in_specs=(PartitionSpec(AXIS, None), PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(AXIS, None), PartitionSpec(AXIS)), check_vma=False)
    arena, logits_NSV = fn(arena, inputs, sharded_pages, offsets)
    return arena, logits_NSV[:layout.n_kv]
