"""`python -m crosspool_jax.disagg.report`: bytes moved between the pools per layer, and CPU step times.

Bytes are counted from the shapes (no profiling): per layer, the attention outputs of all KV
devices go to every weight device (all_gather) and the weight devices' partial FFN outputs
come back summed (psum_scatter). `transfer_bytes` gives both the useful payload and what the
collectives, as written, move per device. The step times run on the simulated CPU devices,
which share the host's cores: there is no real overlap between pools there, so M=1 vs M=2
only shows the pipeline's overhead, not its gain. Real numbers need the GPU machine.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np

_NVLINK_H100_BYTES_PER_S = 450e9        # per direction, per GPU (NVLink 4, 18 links)


@dataclasses.dataclass(frozen=True)
class TransferBytes:
    """Bytes per layer of one step (T tokens per KV device, D hidden, b bytes per element)."""

    to_weights_payload: int       # distinct hidden states sent to the weights pool: n_kv*T*D*b
    to_weights_delivered: int     # what the weight devices receive: n_w copies of it
    back_partials: int            # partial FFN outputs leaving the weights pool: n_w*n_kv*T*D*b
    back_delivered: int           # summed outputs the KV devices receive: n_kv*T*D*b
    collective_per_device: int    # ring traffic one device receives per layer, as the step runs it


def transfer_bytes(*, n_kv: int, n_w: int, tokens_per_device: int, hidden: int, itemsize: int,
                   num_layers: int, num_microbatches: int) -> TransferBytes:
    """Count the per-layer bytes of the exchange for a split and batch (see module docstring)."""
    from crosspool_jax.disagg.pipeline import num_stages
    T, D, b, n = tokens_per_device, hidden, itemsize, n_kv + n_w
    Tm = -(-T // num_microbatches)
    exchanges_per_layer = num_stages(num_layers, num_microbatches) / num_layers
    # one exchange: all_gather of [Tm, D] and psum_scatter of [n, Tm, D]; a ring receives
    # (n - 1) shards of Tm*D for each
    per_exchange = 2 * (n - 1) * Tm * D * b
    return TransferBytes(
        to_weights_payload=n_kv * T * D * b, to_weights_delivered=n_w * n_kv * T * D * b,
        back_partials=n_w * n_kv * T * D * b, back_delivered=n_kv * T * D * b,
        collective_per_device=int(exchanges_per_layer * per_exchange))


def _print_bytes():
    print("Bytes moved between the pools per layer (counted from shapes; bf16)")
    print(f"{'shape':<26}{'split':>6}{'T/dev':>7}{'M':>3}{'payload->W':>12}{'delivered->W':>14}"
          f"{'back (sum)':>12}{'ring/dev':>12}{'us @450GB/s':>13}")
    for name, D in (("qwen3moe-30b-a3b (D=2048)", 2048), ("mixtral-8x7b (D=4096)", 4096)):
        for (n_kv, n_w) in ((1, 1), (2, 2), (4, 4), (6, 2)):
            for T in (64, 1024):
                for M in (1, 2):
                    tb = transfer_bytes(n_kv=n_kv, n_w=n_w, tokens_per_device=T, hidden=D, itemsize=2,
                                        num_layers=48, num_microbatches=M)
                    us = tb.collective_per_device / _NVLINK_H100_BYTES_PER_S * 1e6
                    print(f"{name:<26}{n_kv}+{n_w:<4}{T:>7}{M:>3}{tb.to_weights_payload:>12,}"
                          f"{tb.to_weights_delivered:>14,}{tb.back_delivered:>12,}"
                          f"{tb.collective_per_device:>12,}{us:>13.1f}")
    print("ring/dev: what one device receives per layer from the all_gather + psum_scatter as the step "
          "runs them (zeros of the idle role included); us: that at H100 NVLink speed, before overlap.")


def _time_steps(n_kv: int, n_w: int, repeats: int = 5):
    import jax
    import jax.numpy as jnp

    from crosspool_jax.disagg import build_arena, build_disagg_inputs, disagg_step, make_layout
    from crosspool_jax.engine.random_models import SHAPES
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
        arena = build_arena(kv, ffn, layout)
        inputs, _ = build_disagg_inputs(chunks, layout=layout, num_layers=L, num_microbatches=M)
        arena, logits = disagg_step(arena, inputs, layout=layout, config=config, num_microbatches=M)
        logits.block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            arena, logits = disagg_step(arena, inputs, layout=layout, config=config, num_microbatches=M)
            logits.block_until_ready()
            times.append(time.perf_counter() - t0)
        out[M] = statistics.median(times)
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
        print(f"  {split[0]}+{split[1]}:  M=1 {t[1] * 1e3:8.2f} ms   M=2 {t[2] * 1e3:8.2f} ms")
    print("CPU note: the simulated devices share the host's cores, so the pools do not run in parallel "
          "and these times mean little; they show the pipeline's overhead, not its overlap.")


if __name__ == "__main__":
    main()
