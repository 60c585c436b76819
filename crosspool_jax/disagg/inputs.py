"""Host-side inputs of one disaggregated step: per KV device, per micro-batch `StepInputs`.

Sequences are data-parallel over the KV devices (a sequence's pages live on one device, its
page ids are that device's local ids). Each device's chunks are split into micro-batches
(greedily, each chunk to the micro-batch with the fewest tokens so far, in order; or as the
caller says: lanes of several models put each model's chunks in its own micro-batch); each
(device, micro-batch) is built by `engine.step_inputs.build_step_inputs` and padded to one
common (T, S, Pp) so the stack is one pytree `StepInputs` whose leaves carry two leading axes
`[n_kv, M, ...]`. `logit_rows[d][i]` is where chunk i of device d finds its logits in the
step's `[n_kv, M*S, V]` output (row m*S + s).

Sequence-sharded steps (some sequence's pages on several devices, weight devices included):
each sequence is grouped on its home KV device (`pages.PageMap.home`) as above, and
`build_sharded_pages` adds what each device needs to attend over its own pages of every
sequence: the gathered
view of micro-batch m lists every KV device's T token rows in device order (row k*T + t)
and its S sequences (k*S + s); per device, local slots of the tokens whose page is there,
and per sequence the local pages of its blocks held there with their logical block indices.
The home's own `slots_LT` / `page_indices_LSP` are then unused.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import struct

from crosspool_jax.disagg.layout import ArenaLayout
from crosspool_jax.disagg.pages import PageMap
from crosspool_jax.runtime.shapes import ShapeMenu, StepShape
from crosspool_jax.runtime.step_inputs import StepInputs, bucket, build_step_inputs


@struct.dataclass
class ShardedPages:
    """Per device d of the arena (N = n_kv + n_w: a weight device's row holds pages too), what it
    needs to attend over its local pages of every sequence of a step (n_kv KV devices homing
    the sequences, M micro-batches, L layers, T and S the step's per-device buckets, B the
    bucketed most blocks of one sequence on one device)."""

    seq_T: np.ndarray            # int32 [M, n_kv*T]       sequence (k*S + s) of each gathered token; -1 padding
    slots_LT: np.ndarray         # int32 [N, M, L, n_kv*T] local slot on d of each gathered token; P*G: not on d
    pages_LSB: np.ndarray        # int32 [N, M, L, n_kv*S, B] local pages on d of each sequence's blocks
    blocks_SB: np.ndarray        # int32 [N, M, n_kv*S, B] their logical block indices; -1 unused


def _empty(num_layers: int, num_pages: int, G: int) -> StepInputs:
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    return StepInputs(z(1), z(1), np.full((num_layers, 1), num_pages * G, np.int32), z(num_layers, 1, 1),
                      z(1), z(2), z(1), z(1))


def _pad(x: StepInputs, T: int, S: int, Pp: int, num_pages: int, G: int) -> StepInputs:
    t, s, p = x.token_ids_T.shape[0], x.kv_lens_S.shape[0], x.page_indices_LSP.shape[2]

    def pad(a, widths, value=0):
        return np.pad(np.asarray(a, np.int32), widths, constant_values=value)

    return StepInputs(
        token_ids_T=pad(x.token_ids_T, [(0, T - t)]),
        positions_T=pad(x.positions_T, [(0, T - t)]),
        slots_LT=pad(x.slots_LT, [(0, 0), (0, T - t)], num_pages * G),
        page_indices_LSP=pad(x.page_indices_LSP, [(0, 0), (0, S - s), (0, Pp - p)]),
        kv_lens_S=pad(x.kv_lens_S, [(0, S - s)]),
        cu_q_lens_S1=pad(x.cu_q_lens_S1, [(0, S - s)], int(np.asarray(x.cu_q_lens_S1)[-1])),
        num_seqs_1=np.asarray(x.num_seqs_1, np.int32),
        logits_indices_S=pad(x.logits_indices_S, [(0, S - s)]))


def split_microbatches(chunks: Sequence, num_microbatches: int) -> list[list[int]]:
    """Chunk indices of each micro-batch: each chunk, in order, joins the lightest one."""
    groups, tokens = [[] for _ in range(num_microbatches)], [0] * num_microbatches
    for i, c in enumerate(chunks):
        m = int(np.argmin(tokens))
        groups[m].append(i)
        tokens[m] += c.num_tokens
    return groups


def build_disagg_inputs(chunks_per_device: Sequence[Sequence], *, layout: ArenaLayout, num_layers: int,
                        num_microbatches: int, min_tokens: int = 8, min_seqs: int = 2,
                        min_pages: int = 4, menu: ShapeMenu | None = None,
                        shape: StepShape | None = None,
                        microbatches: Sequence[Sequence[Sequence[int]]] | None = None
                        ) -> tuple[StepInputs, list[list[int]]]:
    """(inputs with leaves [n_kv, M, ...], logit_rows per device per chunk).

    chunks: objects with .start, .num_tokens, .token_ids and .page_table ([L][blocks] of the
    device's local page ids), as `build_step_inputs` takes them. Every (device, micro-batch)
    is padded to one shape: `shape` if given (the warm-up's all-padding steps), else the
    smallest entry of `menu` holding the largest of them, else powers of two at least the
    minimums. microbatches: [n_kv][M] lists of chunk indices (lanes: micro-batch m holds
    lane m's chunks); None splits each device's chunks by `split_microbatches`.
    """
    if len(chunks_per_device) != layout.n_kv:
        raise ValueError(f"chunks_per_device has {len(chunks_per_device)} entries, the layout has "
                         f"{layout.n_kv} KV devices")
    if not isinstance(num_microbatches, (int, np.integer)) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be an integer >= 1, got {num_microbatches!r}")
    P, G = layout.pages_per_device, layout.tokens_per_page
    built, rows = [], []
    for d, chunks in enumerate(chunks_per_device):
        if microbatches is None:
            groups = split_microbatches(chunks, num_microbatches)
        else:
            groups = [list(g) for g in microbatches[d]]
            if len(groups) != num_microbatches or sorted(i for g in groups for i in g) != list(range(len(chunks))):
                raise ValueError(f"microbatches of KV device {d} must be {num_microbatches} lists holding each of "
                                 f"its {len(chunks)} chunks once, got {groups}")
        per_mb = []
        for g in groups:
            if g:
                x, _ = build_step_inputs([chunks[i] for i in g], num_layers=num_layers, tokens_per_page=G,
                                         num_pages=P, min_tokens_bucket=1, min_seqs_bucket=1)
            else:
                x = _empty(num_layers, P, G)
            per_mb.append(x)
        built.append(per_mb)
        rows.append(groups)
    most = [max(getattr(x, f).shape[i] for mb in built for x in mb)
            for f, i in (("token_ids_T", 0), ("kv_lens_S", 0), ("page_indices_LSP", 2))]
    if shape is None and menu is not None:
        shape = menu.ragged(*most)
    if shape is not None:
        T, S, Pp = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
        if most[0] > T or most[1] > S or most[2] > Pp:
            raise ValueError(f"build_disagg_inputs: a micro-batch of {most} (tokens, sequences, blocks) "
                             f"does not fit {shape}")
    else:
        T, S, Pp = bucket(most[0], min_tokens), bucket(most[1], min_seqs), bucket(most[2], min_pages)
    padded = [[_pad(x, T, S, Pp, P, G) for x in mb] for mb in built]
    stacked = StepInputs(*(np.stack([np.stack([getattr(x, f) for x in mb]) for mb in padded])
                           for f in StepInputs.__dataclass_fields__))
    logit_rows = []
    for groups, chunks in zip(rows, chunks_per_device):
        where = {}
        for m, g in enumerate(groups):
            for s, i in enumerate(g):
                where[i] = m * S + s
        logit_rows.append([where[i] for i in range(len(chunks))])
    return stacked, logit_rows


def build_sharded_pages(chunks_per_device: Sequence[Sequence], inputs: StepInputs, *, page_map: PageMap,
                        tokens_per_page: int, num_microbatches: int) -> ShardedPages:
    """The sharded view of a step built by `build_disagg_inputs(chunks_per_device, ...)`.

    chunks_per_device: the same chunks, grouped by home device, but with `.page_table` holding
    GLOBAL page ids ([L][blocks]); `page_map` turns them into (device, local page). Each
    device's block lists are as wide as the step's page tables (`inputs.page_indices_LSP`'s
    bucket: a sequence has at most that many blocks on one device), so the sharded program's
    shapes follow the step's shape and a warm-up compiles them all.
    """
    n_kv, n_dev, M, G = page_map.n_kv, page_map.num_devices, num_microbatches, tokens_per_page
    if len(chunks_per_device) != n_kv:
        raise ValueError(f"chunks_per_device has {len(chunks_per_device)} entries, the page map has {n_kv} KV devices")
    if inputs.token_ids_T.shape[:2] != (n_kv, M):
        raise ValueError(f"inputs lead with {inputs.token_ids_T.shape[:2]}, expected (n_kv, M) = ({n_kv}, {M})")
    T, S, L = inputs.token_ids_T.shape[2], inputs.kv_lens_S.shape[2], inputs.slots_LT.shape[2]
    tables = [[np.asarray(c.page_table, np.int32) for c in chunks] for chunks in chunks_per_device]
    where = [page_map.split(t) for per_dev in tables for t in per_dev]        # validates every id
    most = max([int(np.bincount(dev[0], minlength=n_dev).max()) for dev, _ in where] + [1])
    B = inputs.page_indices_LSP.shape[-1]
    if most > B:
        raise ValueError(f"a sequence has {most} blocks on one device; the step's page tables hold {B}")
    seq_T = np.full((M, n_kv * T), -1, np.int32)
    slots_LT = np.full((n_dev, M, L, n_kv * T), page_map.pages_per_device * G, np.int32)
    pages_LSB = np.zeros((n_dev, M, L, n_kv * S, B), np.int32)
    blocks_SB = np.full((n_dev, M, n_kv * S, B), -1, np.int32)
    for k, chunks in enumerate(chunks_per_device):
        for m, group in enumerate(split_microbatches(chunks, M)):
            offset = 0
            for s, i in enumerate(group):
                c, (dev_LB, local_LB) = chunks[i], page_map.split(tables[k][i])
                if dev_LB.shape[0] != L:
                    raise ValueError(f"page table of {c.request.request_id} has {dev_LB.shape[0]} layers, the "
                                     f"step has {L}")
                rows = k * T + offset + np.arange(c.num_tokens)
                positions = c.start + np.arange(c.num_tokens)
                seq_T[m, rows] = k * S + s
                dev_T, block_T = dev_LB[0, positions // G], positions // G
                for d in range(n_dev):
                    on_d = dev_T == d
                    slots_LT[d, m, :, rows[on_d]] = (local_LB[:, block_T[on_d]] * G + positions[on_d] % G).T
                    mine = np.nonzero(dev_LB[0] == d)[0]
                    pages_LSB[d, m, :, k * S + s, :len(mine)] = local_LB[:, mine]
                    blocks_SB[d, m, k * S + s, :len(mine)] = mine
                offset += c.num_tokens
    return ShardedPages(seq_T, slots_LT, pages_LSB, blocks_SB)
