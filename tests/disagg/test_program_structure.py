"""What the lowered step programs are made of (simulated CPU devices; the structure, not the numbers).

- The placed step programs (forward and sampling) and the CrossPool split's common step have no
  conditional: on a GPU a conditional reads its predicate back to the host, which stalls dispatch.
- Every loop of a multi-step decode has a trip count XLA knows (a fixed max_decode_steps: no
  predicate read back per token); K lanes (models of one architecture) are ONE program with
  one decode loop and a layer scan per lane.
- The split's step exchanges exactly max(n_kv, n_w) collective permutes per direction per stage,
  for K lanes too (one stage body).
- The KV buffers (placed) and the arena (split) are parameters aliased to outputs: updated in
  place, and the placed step never copies them (whatever the page view's shape).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.disagg import build_disagg_inputs, disagg_step, make_layout
from crosspool_jax.disagg.pipeline import p2p_rounds
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_arrays import PackedArrays
from crosspool_jax.runtime.shapes import STOP_IDS, StepShape
from crosspool_jax.runtime.step_inputs import NO_SLOT, StepInputs, build_step_inputs, build_token_slots
from crosspool_jax.runtime.step_program import DecodeLane, _forward_logits, multi_decode, ragged_step
from disagg_tiny import PAGE_ELEMS, PAGES_PER_DEVICE, model, page_elems

P = 32                                   # pages of the placed pool


TOKEN_SLOTS = 64


def _placed_args(config, kv, ffn, shape: StepShape):
    G = PAGE_ELEMS // (config.num_kv_heads * config.head_dim)
    k_buf = jnp.zeros((P, PAGE_ELEMS), jnp.float32)
    v_buf = jnp.zeros((P, PAGE_ELEMS), jnp.float32)
    inputs, _ = build_step_inputs([], shape=shape, num_layers=config.num_layers, tokens_per_page=G, num_pages=P)
    return k_buf, v_buf, inputs


def _step_inputs(x: StepInputs, shape: StepShape) -> tuple:
    """ragged_step's token table and packed (inputs, token slots)."""
    slots = build_token_slots([], shape.num_tokens, shape.num_seqs)
    return jnp.zeros(TOKEN_SLOTS, jnp.int32), PackedArrays.pack((x, slots))


def _conditionals(hlo_text: str) -> int:
    return len(re.findall(r"\bconditional\(", hlo_text))


def _aliased_params(hlo_text: str) -> list[int]:
    """Parameters the compiled module's outputs alias (updated in place)."""
    header = hlo_text.split("\n", 1)[0]
    return [int(p) for p in re.findall(r"\{[\d,]*\}: \((\d+), \{\}", header)]


def test_placed_forward_has_no_conditional_and_writes_kv_in_place():
    config, kv, ffn = model("qwen3_moe", 0)
    k_buf, v_buf, x = _placed_args(config, kv, ffn, StepShape(16, 8, 4))
    forward = jax.jit(_forward_logits, static_argnums=(2, 13, 14), donate_argnums=(3, 4))
    compiled = forward.lower(kv, ffn, config, k_buf, v_buf, x.token_ids_T, x.positions_T, x.slots_LT,
                             x.page_indices_LSP, x.kv_lens_S, x.cu_q_lens_S1, x.num_seqs_1, x.logits_indices_S,
                             "reference", "reference").compile()
    text = compiled.as_text()
    assert _conditionals(text) == 0
    # the two K/V buffers (the parameters right after the weight leaves) are aliased to outputs
    n_weights = len(jax.tree.leaves((kv, ffn)))
    assert _aliased_params(text) == [n_weights, n_weights + 1]


@pytest.mark.parametrize("num_logprobs,all_greedy", [(0, False), (0, True), (4, False)])
def test_placed_ragged_step_has_no_conditional_and_donates_the_pool(num_logprobs, all_greedy):
    config, kv, ffn = model("qwen3_moe", 0)
    k_buf, v_buf, x = _placed_args(config, kv, ffn, StepShape(16, 8, 4))
    meta = smeta.build_sampling_metadata([], pad_rows_to=8)
    counts, mask = smeta.build_token_history([], 8, config.vocab_size, length=16)
    text = ragged_step.lower(kv, ffn, k_buf, v_buf, *_step_inputs(x, StepShape(16, 8, 4)), meta, counts, mask,
                             config=config, num_logprobs=num_logprobs, all_greedy=all_greedy,
                             attention_backend="reference", moe_backend="reference").compile().as_text()
    assert _conditionals(text) == 0          # sampling included: the variant is static, the filters branch-free
    n_weights = len(jax.tree.leaves((kv, ffn)))
    assert _aliased_params(text) == [n_weights, n_weights + 1, n_weights + 2]     # K, V and the token table


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_placed_ragged_step_never_copies_the_pool(kv_heads):
    """The pool's buffers are carried through the layer scan in their own layout: with one KV
    head (as MLA's one latent row), a page view's size-1 dim once let XLA give the carried view
    another layout and copy each whole buffer in and out of every step."""
    from crosspool_jax.models import ModelConfig, init_random_params
    from disagg_tiny import QWEN3_MOE

    config = ModelConfig.from_hf_dict(dict(QWEN3_MOE, num_key_value_heads=kv_heads))
    kv, ffn = init_random_params(config, jax.random.key(0), jnp.float32)
    pages = 8192                                          # 2 MiB per buffer: a copy would dwarf the rest
    G = PAGE_ELEMS // config.kv_cache_row
    k_buf = jnp.zeros((pages, PAGE_ELEMS), jnp.float32)
    v_buf = jnp.zeros((pages, PAGE_ELEMS), jnp.float32)
    x, _ = build_step_inputs([], shape=StepShape(16, 8, 4), num_layers=config.num_layers, tokens_per_page=G,
                             num_pages=pages)
    meta = smeta.build_sampling_metadata([], pad_rows_to=8)
    counts, mask = smeta.build_token_history([], 8, config.vocab_size, length=16)
    compiled = ragged_step.lower(kv, ffn, k_buf, v_buf, *_step_inputs(x, StepShape(16, 8, 4)), meta, counts, mask,
                                 config=config, num_logprobs=0, attention_backend="reference",
                                 moe_backend="reference").compile()
    text = compiled.as_text()
    assert not re.search(rf"= f32\[{pages},[^\n]*\bcopy\(", text)           # no copy of a pool-shaped array
    assert compiled.memory_analysis().temp_size_in_bytes < k_buf.nbytes // 8
    n_weights = len(jax.tree.leaves((kv, ffn)))
    assert _aliased_params(text) == [n_weights, n_weights + 1, n_weights + 2]


@pytest.mark.parametrize("lanes", [1, 2])
def test_multi_decode_loops_have_known_trip_counts_and_no_conditional(lanes):
    """One program for `lanes` models of one architecture: a decode loop of max_decode_steps
    trips holding one layer scan per lane, no conditional, the pool updated in place."""
    config, kv, ffn = model("qwen3_moe", 0)
    S, Pp, steps = 8, 4, 3
    k_buf = jnp.zeros((P, PAGE_ELEMS), jnp.float32)
    v_buf = jnp.zeros((P, PAGE_ELEMS), jnp.float32)
    meta = smeta.build_sampling_metadata([], pad_rows_to=S)
    counts, mask = smeta.build_token_history([], S, config.vocab_size, length=16)
    i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    # lane k's weights are distinct arrays (other models of the architecture), not one model twice
    lane_args = tuple(DecodeLane(jax.tree.map(lambda a, k=k: a + k, kv), jax.tree.map(lambda a, k=k: a + k, ffn),
                                 i32(S), np.ones(S, np.int32), i32(config.num_layers, S, Pp), np.array([1], np.int32),
                                 meta, counts, mask, np.full((S, STOP_IDS), -1, np.int32), np.ones(S, np.int32),
                                 np.full(S, -1, np.int32), np.full(S, NO_SLOT, np.int32))
                      for k in range(lanes))
    table = jnp.zeros(TOKEN_SLOTS, jnp.int32)
    text = multi_decode.lower(lane_args, k_buf, v_buf, table, config=config, num_steps=steps, num_logprobs=0,
                              attention_backend="reference", moe_backend="reference").compile().as_text()
    whiles = re.findall(r"= [^\n]*\bwhile\([^\n]*", text)
    assert whiles, "expected the decode loop and the layer scans"
    for line in whiles:
        assert "known_trip_count" in line, line
    trips = [re.search(r'"n":"(\d+)"', line).group(1) for line in whiles]
    assert trips.count(str(steps)) == 1                              # ONE decode loop: max_decode_steps
    assert trips.count(str(config.num_layers)) == lanes              # each lane's layer scan inside it
    assert _conditionals(text) == 0                                  # its sampling included
    n_inputs = len(jax.tree.leaves(lane_args))
    assert _aliased_params(text) == [n_inputs, n_inputs + 1, n_inputs + 2]   # the pool and the token table


# MLA (latent rows) and GPT-OSS (sinks, a per-layer window traced with the layer, biases) too
@pytest.mark.parametrize("name,n_kv,n_w,lanes", [
    ("qwen3_moe", 1, 1, 2), ("qwen3_moe", 2, 2, 2), ("qwen3_moe", 6, 2, 3), ("glm4_moe_lite", 1, 1, 2),
    ("gpt_oss", 1, 1, 2)])
def test_split_step_has_no_conditional_and_the_expected_exchange(name, n_kv, n_w, lanes):
    """As the runner calls it: the architecture's program, each micro-batch (lane) a model at its
    traced offsets; K lanes are one program with one stage body."""
    config, kv, ffn = model(name, 0)
    layout = make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=PAGES_PER_DEVICE, page_elems=page_elems(config))
    inputs, _ = build_disagg_inputs([[] for _ in range(n_kv)], layout=layout, num_layers=config.num_layers,
                                    num_microbatches=lanes, shape=StepShape(16, 8, 4))
    arena = jax.ShapeDtypeStruct((n_kv + n_w, layout.arena_elems), jnp.float32, sharding=layout.sharding())
    lowered = disagg_step.lower(arena, PackedArrays.pack(inputs), layout=layout.program, config=config,
                                num_microbatches=lanes, offsets=np.stack([layout.offsets()] * lanes))
    stablehlo = lowered.as_text()
    assert "stablehlo.case" not in stablehlo and "stablehlo.if" not in stablehlo
    rounds = len(p2p_rounds(n_kv, n_w))
    # the ping-pong stage (a scan body): `rounds` permutes to the weights pool, `rounds` back
    assert stablehlo.count("stablehlo.collective_permute") == 2 * rounds
    text = lowered.compile().as_text()
    assert _conditionals(text) == 0
    assert _aliased_params(text) == [0]                                    # the arena, in place


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe_dense"])
def test_split_step_slices_no_weight_stack_with_the_kernel_backend(name):
    """Issue 18 in the split program (tests/models/test_weights_read_in_place.py: the placed one):
    lowered for CUDA on the CPU with the kernel backend, no slicing op takes a layer's rows out
    of the arena row viewed [arena_elems / N, N] as the in-place stacks are read
    (`models.transformer.reads_in_place`: projections, routers, dense and expert matrices the kernels can
    tile; `layer_rows`); the reference backend's program does (the control: it materialises
    each layer). This tiny model's 8-expert router (not a multiple of 16) stays a slice on
    XLA's dot."""
    from crosspool_jax.models.transformer import reads_in_place
    config, kv, ffn = model(name, 0)
    layout = make_layout(config, n_kv=1, n_w=1, pages_per_device=PAGES_PER_DEVICE, page_elems=page_elems(config))
    inputs, _ = build_disagg_inputs([[]], layout=layout, num_layers=config.num_layers, num_microbatches=2,
                                    shape=StepShape(16, 8, 4))
    arena = jax.ShapeDtypeStruct((2, layout.arena_elems), jnp.bfloat16, sharding=layout.sharding())
    widths = {s.shape[-1] for _, s in layout.own_slots if reads_in_place(s.name, s.shape)}
    row_views = {(layout.arena_elems // n, n) for n in widths}
    assert len(row_views) >= 2

    def stack_slices(moe_backend):
        text = disagg_step.trace(arena, PackedArrays.pack(inputs), layout=layout.program, config=config,
                                 num_microbatches=2, offsets=np.stack([layout.offsets()] * 2),
                                 attention_backend="reference", moe_backend=moe_backend
                                 ).lower(lowering_platforms=("cuda",)).as_text()
        operands = re.findall(r"stablehlo\.(?:dynamic_slice|slice|gather)\b.*?: \(tensor<([0-9x]+)x[a-z0-9]+>", text)
        return [o for o in operands if tuple(int(d) for d in o.split("x")) in row_views]

    assert stack_slices("gpu") == []
    assert len(stack_slices("reference")) >= 4
