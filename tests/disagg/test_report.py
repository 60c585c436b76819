"""Byte counts of the exchange between the pools (the report's arithmetic)."""
import pytest

from crosspool_jax.disagg.report import transfer_bytes


def test_transfer_bytes_counts_from_shapes():
    kw = dict(n_kv=6, n_w=2, tokens_per_device=64, hidden=2048, itemsize=2, num_layers=4)
    tb = transfer_bytes(**kw, num_microbatches=2)
    row = 64 * 2048 * 2
    assert tb.to_weights_payload == 6 * row
    assert tb.to_weights_delivered == 2 * 6 * row
    assert tb.back_partials == 2 * 6 * row and tb.back_delivered == 6 * row
    # p2p, M=2: 2L+1 = 9 exchanges over 4 layers; the busiest (a weight device) gets 6 half-batches each
    assert tb.busiest_device_received == int(9 / 4 * 6 * (row // 2))
    # p2p, M=1: one exchange per layer of the whole batch
    assert transfer_bytes(**kw, num_microbatches=1).busiest_device_received == 6 * row
    # collective: ring all_gather + psum_scatter bring 7 shards each to every device
    assert transfer_bytes(**kw, num_microbatches=1, exchange="collective").busiest_device_received == 2 * 7 * row
    with pytest.raises(ValueError, match="exchange"):
        transfer_bytes(**kw, num_microbatches=1, exchange="nccl")
