"""Tests of engine.sampler and engine.sampling_metadata: filters, draws, seeds, penalties, logprobs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.runtime import sampler
from crosspool_jax.runtime.sampler import advance_metadata, sample, update_counts
from crosspool_jax.runtime.sampling_metadata import (
    SamplingRow, build_sampling_metadata, build_token_history, max_logprobs,
    needs_penalties, seed_key_data)
from crosspool_jax.sampling_params import SamplingParams

S, V = 8, 32  # the shape most tests reuse (one compilation)


def _rng(seed):
    return np.random.default_rng(seed)


def _row(seed=0, index=0, **params):
    return SamplingRow(SamplingParams(**params), base_seed=seed, output_index=index)


def _meta(rows, pad=S):
    return build_sampling_metadata(rows, pad)


def _filter(logits_SV, rows):
    meta = _meta(rows, pad=logits_SV.shape[0])
    return np.asarray(jax.jit(sampler.apply_filters)(jnp.asarray(logits_SV), meta))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_greedy_is_argmax_and_padding_rows_are_greedy():
    logits = _rng(1).normal(size=(S, V)).astype(np.float32) * 3
    rows = [_row(temperature=0.0, seed=s) for s in range(5)]
    out = sample(logits, _meta(rows))
    np.testing.assert_array_equal(out.token_ids_S, logits.argmax(-1))
    assert out.token_ids_S.dtype == jnp.int32
    assert out.top_ids_SX.shape == (S, 0) and out.top_logprobs_SX.shape == (S, 0)


def test_all_greedy_program_equals_the_general_one_on_greedy_rows():
    logits = _rng(11).normal(size=(S, V)).astype(np.float32) * 2
    greedy = [_row(temperature=0.0, seed=s, logprobs=3) for s in range(6)]
    fast = sample(logits, _meta(greedy), num_logprobs=3, all_greedy=True)
    general = sample(logits, _meta(greedy), num_logprobs=3)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(general)):
        np.testing.assert_array_equal(a, b)
    # a mixed batch in the general program: greedy rows take the argmax, the others draw
    mixed = greedy[:3] + [_row(temperature=5.0, seed=s) for s in range(3)]
    out = np.asarray(sample(logits, _meta(mixed)).token_ids_S)
    np.testing.assert_array_equal(out[:3], logits[:3].argmax(-1))
    assert (out[3:6] != logits[3:6].argmax(-1)).any()     # hot rows drew (a fixed seed: deterministic)


def test_sampling_programs_have_no_conditional():
    meta = _meta([_row(temperature=1.0, top_k=3, top_p=0.5, min_p=0.1)])
    for all_greedy in (False, True):
        text = sample.lower(jnp.zeros((S, V)), meta, num_logprobs=2, all_greedy=all_greedy).as_text()
        assert "stablehlo.case" not in text and "stablehlo.if" not in text


def test_top_k_1_equals_greedy_at_any_temperature():
    logits = _rng(2).normal(size=(S, V)).astype(np.float32)
    rows = [_row(temperature=t, top_k=1, seed=s) for s, t in enumerate([0.5, 1.0, 2.0, 7.0] * 2)]
    out = sample(logits, _meta(rows))
    np.testing.assert_array_equal(out.token_ids_S, logits.argmax(-1))


def test_top_k_keeps_exactly_k_largest():
    logits = _rng(3).normal(size=(S, V)).astype(np.float32)
    ks = [1, 2, 5, 31, 32, 100, 0, -1]
    kept = _filter(logits, [_row(top_k=k) for k in ks]) > -np.inf
    for s, k in enumerate(ks):
        k = V if k <= 0 else min(k, V)
        np.testing.assert_array_equal(np.flatnonzero(kept[s]), np.sort(np.argsort(-logits[s])[:k]))


def _logits_of_probs(probs, perm, V=V):
    """Logits whose softmax puts probs[i] on token perm[i], tokens beyond get ~0 mass."""
    logits = np.full(V, -1e4, np.float32)
    logits[perm[:len(probs)]] = np.log(probs)
    return logits


def test_top_p_keeps_smallest_set_reaching_p():
    rng = _rng(4)
    probs = np.array([0.42, 0.27, 0.16, 0.09, 0.06])
    cases = [(0.3, 1), (0.5, 2), (0.72, 3), (0.8, 3), (0.9, 4), (0.97, 5), (1.0, V), (0.01, 1)]
    perms = [rng.permutation(V) for _ in cases]
    logits = np.stack([_logits_of_probs(probs, p) for p in perms])
    kept = _filter(logits, [_row(top_p=p) for p, _ in cases]) > -np.inf
    for s, ((p, n), perm) in enumerate(zip(cases, perms)):
        assert set(np.flatnonzero(kept[s])) == set(perm[:n]), (p, n)


def test_top_p_applies_to_the_top_k_distribution():
    # After top_k=2 the mass is 0.6/0.9 and 0.3/0.9: top_p=0.6 keeps only the first (0.667 >= 0.6).
    probs = np.array([0.6, 0.3, 0.1])
    perm = _rng(5).permutation(V)
    logits = np.stack([_logits_of_probs(probs, perm)] * S)
    kept = _filter(logits, [_row(top_k=2, top_p=0.65), _row(top_p=0.65)]) > -np.inf
    assert set(np.flatnonzero(kept[0])) == {perm[0]}
    assert set(np.flatnonzero(kept[1])) == {perm[0], perm[1]}


def test_min_p_filters_relative_to_max_prob():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    perm = _rng(6).permutation(V)
    logits = np.stack([_logits_of_probs(probs, perm)] * S)
    cases = [(0.6, 2), (0.3, 3), (0.2, 4), (0.9, 1), (0.0, V)]
    kept = _filter(logits, [_row(min_p=m) for m, _ in cases]) > -np.inf
    for s, (m, n) in enumerate(cases):
        assert set(np.flatnonzero(kept[s])) == set(perm[:n]), (m, n)


def _np_filtered_probs(logits, temperature, top_k, top_p, min_p):
    x = logits / temperature
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    keep[order[:top_k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    cum_before = np.cumsum(p[order]) - p[order]
    keep_p = np.zeros(len(x), bool)
    keep_p[order[cum_before < top_p]] = True
    keep &= keep_p
    keep &= np.exp(x - x.max()) >= min_p
    p = np.exp(x - x.max()) * keep
    return p / p.sum()


def test_empirical_distribution_matches_filtered_softmax():
    # N independent draws (one row each, distinct seeds); each category count is binomial,
    # so |freq - p| <= 5 * sqrt(p (1 - p) / N) fails with probability < 1e-5 per category
    # (and the draws are fixed by the seeds, so the test is deterministic).
    N, V8 = 20000, 8
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.3, -0.5, -1.0, 0.9], np.float32)
    temperature, top_k, top_p, min_p = 0.8, 6, 0.95, 0.08
    expected = _np_filtered_probs(logits.astype(np.float64), temperature, top_k, top_p, min_p)
    assert 3 <= (expected > 0).sum() < 6  # the filters do remove tokens here
    rows = [_row(seed=1000 + i, index=i % 7, temperature=temperature, top_k=top_k,
                 top_p=top_p, min_p=min_p) for i in range(N)]
    out = sample(np.tile(logits, (N, 1)), _meta(rows, pad=N))
    freq = np.bincount(np.asarray(out.token_ids_S), minlength=V8) / N
    tol = 5 * np.sqrt(expected * (1 - expected) / N)
    assert np.all(freq[expected == 0] == 0)
    np.testing.assert_array_less(np.abs(freq - expected), tol + 1e-12)


def test_seed_reproducible_across_positions_and_batch_sizes():
    rng = _rng(7)
    row_logits = rng.normal(size=V).astype(np.float32)
    target = _row(seed=1234, index=5, temperature=1.3, top_p=0.9)
    others = [_row(seed=int(rng.integers(1 << 40)), index=int(rng.integers(50)),
                   temperature=1.0) for _ in range(S)]
    tokens = []
    for pos, batch in [(0, S), (3, S), (7, S), (0, 1), (1, 3)]:
        rows = others[:batch - 1]
        rows.insert(pos, target)
        logits = rng.normal(size=(batch, V)).astype(np.float32)
        logits[pos] = row_logits
        tokens.append(int(sample(logits, _meta(rows, pad=batch)).token_ids_S[pos]))
    assert len(set(tokens)) == 1
    # Other output indices or seeds give other draws (with flat logits, 16 draws all equal
    # would have probability 32**-15).
    flat = np.tile(rng.normal(size=V).astype(np.float32) * 0.1, (16, 1))
    by_index = sample(flat, _meta([_row(seed=9, index=i) for i in range(16)], pad=16)).token_ids_S
    by_seed = sample(flat, _meta([_row(seed=i, index=0) for i in range(16)], pad=16)).token_ids_S
    assert len(set(np.asarray(by_index).tolist())) > 1
    assert len(set(np.asarray(by_seed).tolist())) > 1


def test_seed_key_data_matches_jax_key():
    for seed in [0, 5, 2**31 + 3, 2**32 - 1]:
        np.testing.assert_array_equal(seed_key_data(seed), jax.random.key_data(jax.random.key(seed)))
    # Seeds beyond 32 bits keep their high bits (jax.random.key drops them without x64).
    np.testing.assert_array_equal(seed_key_data(2**40 + 7), [256, 7])
    np.testing.assert_array_equal(seed_key_data(-1), [2**32 - 1, 2**32 - 1])


def _history_rows(rng, n):
    rows = []
    for s in range(n):
        params = SamplingParams(temperature=0.0, repetition_penalty=float(rng.uniform(0.5, 2.0)),
                                presence_penalty=float(rng.uniform(-2, 2)),
                                frequency_penalty=float(rng.uniform(-2, 2)))
        rows.append(SamplingRow(params, s, 0, prompt_token_ids=rng.integers(0, V, rng.integers(1, 20)).tolist(),
                                output_token_ids=rng.integers(0, V, rng.integers(0, 20)).tolist()))
    return rows


def test_penalties_match_numpy():
    rng = _rng(8)
    rows = _history_rows(rng, S - 2)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 2
    counts, prompt_mask = build_token_history(rows, S, V, length=64)
    meta = _meta(rows)
    got = np.asarray(jax.jit(sampler.apply_penalties)(jnp.asarray(logits), meta, counts, prompt_mask))
    want = logits.copy()
    for s, r in enumerate(rows):
        c = np.bincount(r.output_token_ids, minlength=V)
        seen = (c > 0) | (np.bincount(r.prompt_token_ids, minlength=V) > 0)
        np.testing.assert_array_equal(np.asarray(counts[s]), c)
        np.testing.assert_array_equal(np.asarray(prompt_mask[s]), np.bincount(r.prompt_token_ids, minlength=V) > 0)
        p = r.params
        x = want[s]
        x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
        x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Greedy sampling uses the penalised logits; logprobs stay those of the raw logits.
    out = sample(logits, meta, counts, prompt_mask, num_logprobs=3)
    np.testing.assert_array_equal(out.token_ids_S, want.argmax(-1))
    raw = _np_log_softmax(logits)
    np.testing.assert_allclose(out.logprob_S, raw[np.arange(S), want.argmax(-1)], rtol=1e-5, atol=1e-6)
    assert needs_penalties(rows) and not needs_penalties([_row(temperature=0.5)])


def test_update_counts_and_history_padding():
    rng = _rng(9)
    rows = _history_rows(rng, 3)
    counts, mask = build_token_history(rows, S, V, length=64)
    assert counts.shape == (S, V) and mask.shape == (S, V)
    assert int(counts[3:].sum()) == 0 and not bool(mask[3:].any())
    tokens = rng.integers(0, V, S).astype(np.int32)
    new = np.asarray(update_counts(counts, jnp.asarray(tokens)))
    want = np.asarray(counts).copy()
    want[np.arange(S), tokens] += 1
    np.testing.assert_array_equal(new, want)


def test_history_row_order_permutes_rows():
    """row_order puts padded row row_order[s] at row s (the split's device-row order)."""
    rng = _rng(11)
    rows = _history_rows(rng, 3)
    order = rng.permutation(S)
    counts, mask = build_token_history(rows, S, V, length=64)
    counts_o, mask_o = build_token_history(rows, S, V, length=64, row_order=order)
    np.testing.assert_array_equal(np.asarray(counts_o), np.asarray(counts)[order])
    np.testing.assert_array_equal(np.asarray(mask_o), np.asarray(mask)[order])
    assert int(np.asarray(counts).sum()) > 0


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    logits = _rng(10).normal(size=(S, V)).astype(np.float32)
    logits[:, 3] = 50.0  # EOS
    logits[:, 7] = 40.0  # a stop token id
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    rows = [SamplingRow(SamplingParams(**params), 0, i, eos_token_ids=[3]) for i in range(3)]
    rows.append(SamplingRow(SamplingParams(**params, ignore_eos=True), 0, 0, eos_token_ids=[3]))
    rows.append(SamplingRow(SamplingParams(temperature=1.0, min_tokens=3), 11, 0, eos_token_ids=[3, 7]))
    meta = _meta(rows)
    np.testing.assert_array_equal(meta.suppress_S[:5], [True, True, False, True, True])
    tokens = np.asarray(sample(logits, meta).token_ids_S)
    masked = logits.copy()
    masked[:, [3, 7]] = -np.inf
    assert tokens[0] == masked[0].argmax() and tokens[1] == masked[1].argmax()
    assert tokens[2] == 3  # min_tokens reached
    assert tokens[3] == 3  # ignore_eos: EOS is not suppressed (it only stops later)
    assert tokens[4] not in (3, 7)
    # advance_metadata: output_index + steps, and suppression ends once min_tokens is reached.
    nxt = advance_metadata(meta)
    np.testing.assert_array_equal(nxt.output_index[:5], [1, 2, 3, 1, 1])
    np.testing.assert_array_equal(nxt.suppress_S[:5], [True, False, False, True, True])
    later = jax.jit(advance_metadata)(meta, jnp.int32(2), jnp.full(S, 4, jnp.int32))
    np.testing.assert_array_equal(later.output_index[:5], [2, 3, 4, 2, 2])
    np.testing.assert_array_equal(later.suppress_S[:5], [True, True, False, True, True])


def test_logprobs_are_raw_log_softmax_and_top_ids_argsort():
    rng = _rng(11)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 4
    rows = [_row(seed=s, temperature=0.7 + 0.2 * s, top_k=5, logprobs=4) for s in range(S)]
    assert max_logprobs(rows) == 4 and max_logprobs([_row()]) == 0
    out = sample(logits, _meta(rows), num_logprobs=4)
    raw = _np_log_softmax(logits.astype(np.float64))
    toks = np.asarray(out.token_ids_S)
    np.testing.assert_allclose(out.logprob_S, raw[np.arange(S), toks], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.top_ids_SX, np.argsort(-logits, axis=-1)[:, :4])
    np.testing.assert_allclose(out.top_logprobs_SX, np.sort(raw, -1)[:, ::-1][:, :4], rtol=1e-5, atol=1e-5)
    # Every draw lies within its row's top-5.
    assert all(t in np.argsort(-logits[s])[:5] for s, t in enumerate(toks))


def test_sample_inside_jit_with_bfloat16_logits_and_odd_shapes():
    rng = _rng(12)
    logits = jnp.asarray(rng.normal(size=(3, 11)), jnp.bfloat16)
    rows = [_row(seed=1, temperature=0.0), _row(seed=2, temperature=0.9, top_p=0.5)]
    meta = build_sampling_metadata(rows, 3)

    @jax.jit
    def step(logits, meta):
        out = sample(logits, meta, num_logprobs=2)
        return out, advance_metadata(meta)

    out, nxt = step(logits, meta)
    assert out.token_ids_S.shape == (3,) and out.top_ids_SX.shape == (3, 2)
    assert int(out.token_ids_S[0]) == int(jnp.argmax(logits[0].astype(jnp.float32)))
    np.testing.assert_array_equal(nxt.output_index, [1, 1, 1])


def test_metadata_padding_and_validation():
    meta = _meta([_row(seed=3, index=4, temperature=0.5, top_k=-1, top_p=0.9, min_p=0.1)])
    assert float(meta.temperature[0]) == 0.5 and int(meta.top_k[0]) == 0
    assert np.all(np.asarray(meta.temperature[1:]) == 0) and np.all(np.asarray(meta.top_p[1:]) == 1)
    assert meta.suppress_ids_SZ.shape[1] % 8 == 0 and meta.num_rows == S
    assert float(_meta([_row(temperature=1e-6)]).temperature[0]) == 0.0  # tiny temperature: greedy
    with pytest.raises(ValueError, match="pad_rows_to"):
        build_sampling_metadata([_row()] * 3, 2)
    with pytest.raises(ValueError, match="output_index"):
        SamplingRow(SamplingParams(), 0, -1)
    with pytest.raises(ValueError, match="params"):
        SamplingRow({"temperature": 0}, 0, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        build_token_history([_row()], S, 0, length=64)
    assert dataclasses.replace(meta, output_index=meta.output_index + 1).num_rows == S


def _np_logits_table(logits_V, table, allowed_only):
    """The logits table in numpy: bias added at each id (-inf bans), others masked if allowed_only."""
    out = logits_V.copy()
    keep = np.zeros(len(out), bool)
    for t, b in table.items():
        out[t] += b
        keep[t] = True
    if allowed_only:
        out[~keep] = -np.inf
    return out


def test_logits_table_matches_numpy_and_drives_greedy_and_draws():
    """logit_bias, allowed_token_ids and bad words (one token and several) against numpy."""
    rng = _rng(13)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={5: 30.0, 6: -2.5}), 0, 0),
        SamplingRow(SamplingParams(temperature=0.0, allowed_token_ids=[1, 2, 9], logit_bias={9: 1.5, 4: 50.0}), 0, 0),
        SamplingRow(SamplingParams(temperature=0.0, bad_words=["x", "yz"]), 0, 2, output_token_ids=[7, 11],
                    bad_words_ids=[[int(logits[2].argmax())], [11, 12], [10, 13]]),
        SamplingRow(SamplingParams(temperature=50.0, seed=4, allowed_token_ids=[3, 8, 20]), 4, 0),
        _row(temperature=0.0),
    ]
    meta = _meta(rows)
    got = np.asarray(jax.jit(sampler.apply_logits_table)(jnp.asarray(logits), meta))
    for s, r in enumerate(rows):
        np.testing.assert_allclose(got[s], _np_logits_table(logits[s], *r.logits_table()), rtol=1e-6)
    np.testing.assert_array_equal(got[5:], logits[5:])                    # padding rows untouched
    # the tables: the bias of an id outside allowed_token_ids is dropped; a bad word of two
    # tokens bans its last one only after its first (11 was just generated, 10 was not)
    assert rows[1].logits_table() == ({1: 0.0, 2: 0.0, 9: 1.5}, True)
    assert rows[2].logits_table() == ({int(logits[2].argmax()): -np.inf, 12: -np.inf}, False)
    out = sample(logits, meta)
    tokens = np.asarray(out.token_ids_S)
    assert tokens[0] == 5 and tokens[1] == 9 and tokens[4] == logits[4].argmax()
    assert tokens[2] == np.where(np.isin(np.arange(V), [logits[2].argmax(), 12]), -np.inf, logits[2]).argmax()
    draws = {int(sample(logits, _meta([dataclasses.replace(rows[3], base_seed=k)])).token_ids_S[0])
             for k in range(40)}
    assert draws <= {3, 8, 20} and len(draws) >= 2


def test_sampled_rank_counts_logprobs_at_least_its_own():
    rng = _rng(14)
    logits = rng.normal(size=(S, V)).astype(np.float32)
    rows = [_row(seed=s, temperature=5.0) for s in range(S)]        # hot: mostly outside the top few
    out = sample(logits, _meta(rows), num_logprobs=2)
    raw = _np_log_softmax(logits.astype(np.float64))
    toks = np.asarray(out.token_ids_S)
    want = (logits >= logits[np.arange(S), toks][:, None]).sum(-1)
    np.testing.assert_array_equal(out.rank_S, want)
    assert (want > 2).any()                                          # some ranks outside the top-2
    np.testing.assert_allclose(out.logprob_S, raw[np.arange(S), toks], rtol=1e-5, atol=1e-6)
    greedy = sample(logits, _meta([_row(temperature=0.0)] * S))
    np.testing.assert_array_equal(greedy.rank_S, np.ones(S))
