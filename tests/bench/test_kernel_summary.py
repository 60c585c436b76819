"""The decode kernel summary: kernels per token and layer, busy time as the union of intervals,
op kinds without numeric suffixes, the most time first."""
import pytest

from crosspool_jax.bench.kernel_summary import op_kind, summarize_kernels


@pytest.mark.parametrize("name,kind", [("fusion.123 [loop_fusion_7]", "loop_fusion"),
                                       ("fusion.3 [gemm_fusion_dot_4_1]", "gemm_fusion_dot"),
                                       ("custom-call.5 [ragged_paged_mla_bk32_ns16]", "ragged_paged_mla_bk32_ns16"),
                                       ("input_reduce_fusion_2", "input_reduce_fusion"),
                                       ("Memcpy DtoD", "Memcpy DtoD")])
def test_op_kind(name, kind):
    assert op_kind(name) == kind


def test_per_token_and_layer_counts_and_busy_union():
    # two tokens of a 2-layer model: per token, per layer a memcpy (10 ns) and a gemm (20 ns,
    # overlapping the memcpy by 5), then one sampling fusion (4 ns) after a 6 ns gap
    events, t = [], 0
    for token in range(2):
        for layer in range(2):
            events.append((f"Memcpy DtoD", t, 10))
            events.append((f"fusion.{token}{layer} [gemm_fusion_dot_{layer}]", t + 5, 20))
            t += 25
        events.append((f"fusion.9{token} [loop_fusion_{token}]", t + 6, 4))
        t += 10
    s = summarize_kernels(events[::-1], tokens=2, num_layers=2)       # any order in
    assert s.kernels == 10 and s.kernels_per_token == 5 and s.kernels_per_layer == 2.5
    assert s.busy_us == pytest.approx((4 * 25 + 2 * 4) / 1e3)          # overlaps counted once
    assert s.span_us == pytest.approx(t / 1e3)
    assert [(k, n) for k, n, _ in s.top] == [("gemm_fusion_dot", 4), ("Memcpy DtoD", 4), ("loop_fusion", 2)]
    assert s.top[0][2] == pytest.approx(80 / 1e3)
    lines = s.lines()
    assert "5.0 per token, 2.5 per layer (2 layers)" in lines[0]
    assert lines[2].split()[0] == "gemm_fusion_dot" and lines[2].split()[1:3] == ["2.00", "0.04"]


def test_top_is_capped_and_bad_counts_refused():
    events = [(f"k{i} [kind_{chr(97 + i)}]", 10 * i, i + 1) for i in range(20)]
    assert len(summarize_kernels(events, tokens=1, num_layers=1, top=3).top) == 3
    with pytest.raises(ValueError, match="tokens"):
        summarize_kernels(events, tokens=0, num_layers=1)
