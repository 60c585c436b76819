"""`python -m crosspool_jax.disagg.report`: bytes moved between the pools per layer, and CPU step times.

Bytes are counted from the shapes (no profiling): per layer, the attention outputs of all KV
devices go to every weight device and the weight devices' partial FFN outputs come back and
are summed. `transfer_bytes` gives the useful payload and what the busiest device receives
with each exchange of `pipeline.py` ("p2p" ppermute rounds, or "collective"). The step times run on the simulated CPU devices,
which share the host's cores: there is no real overlap between pools there, so M=1 vs M=2
only shows the pipeline's overhead, not its gain. Real numbers need the GPU machine.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time

import numpy as np

_NVLINK_H100_BYTES_PER_S = 450e9        # per direction, per GPU (NVLink 4, 18 links)


def no_exchange(layout, d, Tm: int, D: int):
    """An exchange factory FOR TIMING ONLY (`disagg_step(..., exchange=no_exchange)`): nothing
    moves between the pools, each device hands itself its own data, so the outputs are wrong.
    t(step) - t(step without exchange) is the transfer time the schedule did not hide."""
    import jax.numpy as jnp
    n_kv = layout.n_kv

    def to_weights(h_TX):              # this device's own rows, as if every KV device had sent them
        X = h_TX.shape[-1]
        return jnp.broadcast_to(h_TX[None], (n_kv, Tm, X)).reshape(n_kv * Tm, X)

    def to_kv(y_TD):
        return y_TD.reshape(n_kv, Tm, D)[0]
    return to_weights, to_kv


@dataclasses.dataclass(frozen=True)
class TransferBytes:
    """Bytes per layer of one step (T tokens per KV device, D hidden, E router logits beside it,
    b bytes per element)."""

    to_weights_payload: int       # distinct FFN inputs sent to the weights pool: n_kv*T*(D+E)*b
    to_weights_delivered: int     # what the weight devices receive: n_w copies of it
    back_partials: int            # partial FFN outputs leaving the weights pool: n_w*n_kv*T*D*b
    back_delivered: int           # summed outputs the KV devices receive: n_kv*T*D*b
    busiest_device_received: int  # bytes the most loaded device receives per layer, as the step runs


def transfer_bytes(*, n_kv: int, n_w: int, tokens_per_device: int, hidden: int, itemsize: int,
                   num_layers: int, num_microbatches: int, exchange: str = "p2p", experts: int = 0) -> TransferBytes:
    """Count the per-layer bytes of the exchange for a split and batch (see module docstring).

    p2p: a KV device receives n_w partials of its Tm tokens, a weight device n_kv micro-batches
    of FFN inputs (x and, for a MoE model, its `experts` router logits), per exchange.
    collective: a ring all_gather and psum_scatter each bring (n - 1) shards of Tm*D to every
    device. M=2 runs 2L+1 exchanges of T/2 tokens, M=1 L of T.
    """
    from crosspool_jax.disagg.pipeline import num_stages
    if exchange not in ("p2p", "collective"):
        raise ValueError(f"exchange must be 'p2p' or 'collective', got {exchange!r}")
    T, D, b, n = tokens_per_device, hidden, itemsize, n_kv + n_w
    Tm = -(-T // num_microbatches)
    exchanges_per_layer = num_stages(num_layers, num_microbatches) / num_layers
    X = D + experts
    shard, shard_in = Tm * D * b, Tm * X * b
    per_exchange = max(n_w * shard, n_kv * shard_in) if exchange == "p2p" else (n - 1) * (shard + shard_in)
    return TransferBytes(
        to_weights_payload=n_kv * T * X * b, to_weights_delivered=n_w * n_kv * T * X * b,
        back_partials=n_w * n_kv * T * D * b, back_delivered=n_kv * T * D * b,
        busiest_device_received=int(exchanges_per_layer * per_exchange))


def _print_bytes():
    print("Bytes moved between the pools per layer (counted from shapes; bf16; 48 layers)")
    print(f"{'shape':<26}{'split':>6}{'T/dev':>7}{'M':>3}{'payload->W':>12}{'delivered->W':>14}"
          f"{'back (sum)':>12}{'p2p busiest':>13}{'us':>7}{'coll. busiest':>15}{'us':>7}")
    for name, D in (("qwen3moe-30b-a3b (D=2048)", 2048), ("mixtral-8x7b (D=4096)", 4096)):
        for (n_kv, n_w) in ((1, 1), (2, 2), (4, 4), (6, 2)):
            for T in (64, 1024):
                for M in (1, 2):
                    kw = dict(n_kv=n_kv, n_w=n_w, tokens_per_device=T, hidden=D, itemsize=2, num_layers=48,
                              num_microbatches=M)
                    p2p = transfer_bytes(**kw)
                    coll = transfer_bytes(**kw, exchange="collective")
                    us = [x.busiest_device_received / _NVLINK_H100_BYTES_PER_S * 1e6 for x in (p2p, coll)]
                    print(f"{name:<26}{n_kv}+{n_w:<4}{T:>7}{M:>3}{p2p.to_weights_payload:>12,}"
                          f"{p2p.to_weights_delivered:>14,}{p2p.back_delivered:>12,}"
                          f"{p2p.busiest_device_received:>13,}{us[0]:>7.1f}"
                          f"{coll.busiest_device_received:>15,}{us[1]:>7.1f}")
    print("busiest: bytes the most loaded device receives per layer (both directions) with exchange='p2p' "
          "(ppermute rounds) or 'collective' (all_gather + psum_scatter); us: that at H100 NVLink speed "
          f"({_NVLINK_H100_BYTES_PER_S / 1e9:.0f} GB/s per direction), before any overlap.")


def _time_steps(n_kv: int, n_w: int, repeats: int = 5):
    import jax
    import jax.numpy as jnp

    from crosspool_jax.disagg import build_arena, build_disagg_inputs, disagg_step, make_layout
    from crosspool_jax.models.random_models import SHAPES
    from crosspool_jax.models import ModelConfig, init_random_params

    config = ModelConfig.from_hf_dict(SHAPES["qwen3moe-mini-2l"])
    kv, ffn = init_random_params(config, jax.random.key(0), jnp.float32)
    layout = make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=256)
    G, L = layout.tokens_per_page, config.num_layers
    rng = np.random.default_rng(0)

    @dataclasses.dataclass
    class Chunk:
        token_ids: np.ndarray
        start: int
        page_table: np.ndarray

        @property
        def num_tokens(self):
            return len(self.token_ids)

    seqs_per_device, context = 16, 48              # a decode step: 16 sequences of 48 tokens each
    blocks = -(-(context + 1) // G)
    chunks = []
    for _ in range(n_kv):
        perm = rng.permutation(layout.pages_per_device)
        chunks.append([Chunk(rng.integers(0, config.vocab_size, 1).astype(np.int32), context,
                             perm[i * L * blocks:(i + 1) * L * blocks].reshape(L, blocks))
                       for i in range(seqs_per_device)])
    out = {}
    for M in (1, 2):
        for exchange in ("p2p", "collective"):
            arena = build_arena(kv, ffn, layout)
            inputs, _ = build_disagg_inputs(chunks, layout=layout, num_layers=L, num_microbatches=M)
            run = functools.partial(disagg_step, layout=layout, config=config, num_microbatches=M,
                                    exchange=exchange)
            arena, logits = run(arena, inputs)
            logits.block_until_ready()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                arena, logits = run(arena, inputs)
                logits.block_until_ready()
                times.append(time.perf_counter() - t0)
            out[M, exchange] = statistics.median(times)
    return out


def main():
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _print_bytes()
    import jax
    print(f"\nStep time on {len(jax.devices())} {jax.devices()[0].platform} device(s), JAX {jax.__version__}, "
          f"qwen3moe-mini-2l shape (D=256, 16 experts), decode of 16 sequences per KV device, median of 5:")
    for split in ((1, 1), (2, 2), (4, 4), (6, 2)):
        if sum(split) > len(jax.devices()):
            continue
        t = _time_steps(*split)
        print(f"  {split[0]}+{split[1]}:  " + "   ".join(f"M={m} {ex:<10} {t[m, ex] * 1e3:8.2f} ms"
                                                       for m in (1, 2) for ex in ("p2p", "collective")))
    print("CPU note: the simulated devices share the host's cores, so the pools do not run in parallel "
          "and these times mean little; they show the pipeline's overhead, not its overlap.")


if __name__ == "__main__":
    main()
