"""Byte counts of the exchange between the pools (the report's arithmetic)."""
from crosspool_jax.disagg.report import transfer_bytes


def test_transfer_bytes_counts_from_shapes():
    tb = transfer_bytes(n_kv=6, n_w=2, tokens_per_device=64, hidden=2048, itemsize=2, num_layers=4,
                        num_microbatches=2)
    row = 64 * 2048 * 2
    assert tb.to_weights_payload == 6 * row
    assert tb.to_weights_delivered == 2 * 6 * row
    assert tb.back_partials == 2 * 6 * row and tb.back_delivered == 6 * row
    # 2L+M-1 = 9 exchanges over 4 layers, each an all_gather + psum_scatter of half-size micro-batches
    assert tb.collective_per_device == int(9 / 4 * 2 * 7 * (row // 2))
    one = transfer_bytes(n_kv=6, n_w=2, tokens_per_device=64, hidden=2048, itemsize=2, num_layers=4,
                         num_microbatches=1)
    assert one.collective_per_device == 2 * 2 * 7 * row
