"""Sampling: each filter keeps exactly the tokens transformers' warpers keep, and draws match the renormalised probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yalm_jax.errors import UserError
from yalm_jax.sampling import SamplingParams, sample

N_DRAWS = 4000


def _draw(logits, params, n=N_DRAWS, seed=0, cap=256):
    keys = jax.random.split(jax.random.key(seed), n)
    fn = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits), k, params, cap=cap)))
    return np.asarray(fn(keys))


def _logits(v=12, seed=1):
    return np.random.default_rng(seed).normal(size=v).astype(np.float32) * 2


def _probs(logits, temperature=1.0):
    z = np.exp((logits - logits.max()) / temperature)
    return z / z.sum()


def _assert_frequencies(draws, expected):
    """Chi-square-style check: every token's count within 5 sigma of its expectation."""
    counts = np.bincount(draws, minlength=len(expected))
    n = len(draws)
    sigma = np.sqrt(n * expected * (1 - expected)) + 1
    assert np.all(np.abs(counts - n * expected) <= 5 * sigma), (counts, n * expected)


def test_greedy_is_argmax_without_key_dependence():
    logits = _logits(v=49152)
    draws = _draw(logits, SamplingParams.greedy(), n=8)
    assert set(draws.tolist()) == {int(np.argmax(logits))}


def test_plain_temperature_sampling_matches_softmax():
    logits = _logits()
    draws = _draw(logits, SamplingParams.make(temperature=0.7))
    _assert_frequencies(draws, _probs(logits, 0.7))


@pytest.mark.parametrize("cap", [256, 4])  # 4 < top_k forces the full-sort path
def test_top_k_keeps_only_the_k_largest(cap):
    logits = _logits()
    k = 5
    draws = _draw(logits, SamplingParams.make(temperature=1.0, top_k=k), cap=cap)
    top = np.argsort(-logits)[:k]
    assert set(draws.tolist()) <= set(top.tolist())
    expected = np.zeros_like(logits)
    expected[top] = _probs(logits[top])
    _assert_frequencies(draws, expected)


@pytest.mark.parametrize("cap", [256, 2])  # a 2-token cap cannot hold the nucleus: full sort
def test_top_p_samples_the_nucleus_with_renormalised_frequencies(cap):
    logits = _logits()
    p = 0.8
    probs = _probs(logits)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[mass_before < p]
    assert probs[nucleus].sum() >= p and len(nucleus) < len(logits)
    draws = _draw(logits, SamplingParams.make(temperature=1.0, top_p=p), cap=cap)
    assert set(draws.tolist()) <= set(nucleus.tolist())
    expected = np.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    _assert_frequencies(draws, expected)


def test_tiny_top_p_keeps_one_token():
    logits = _logits()
    draws = _draw(logits, SamplingParams.make(temperature=1.0, top_p=1e-6), n=64)
    assert set(draws.tolist()) == {int(np.argmax(logits))}


def test_min_p_keeps_tokens_above_fraction_of_max():
    logits = _logits()
    m = 0.2
    probs = _probs(logits)
    kept = np.flatnonzero(probs >= m * probs.max())
    draws = _draw(logits, SamplingParams.make(temperature=1.0, min_p=m))
    assert set(draws.tolist()) <= set(kept.tolist())
    expected = np.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    _assert_frequencies(draws, expected)


def test_filters_compose_in_transformers_order():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = _logits(v=40, seed=3)
    t, k, p, m = 1.3, 12, 0.7, 0.1
    scores = torch.tensor(logits)[None]
    for warper in (TemperatureLogitsWarper(t), TopKLogitsWarper(k), TopPLogitsWarper(p), MinPLogitsWarper(m)):
        scores = warper(None, scores)
    expected = torch.softmax(scores, -1)[0].numpy()
    draws = _draw(logits, SamplingParams.make(temperature=t, top_k=k, top_p=p, min_p=m))
    assert set(draws.tolist()) <= set(np.flatnonzero(expected > 0).tolist())
    _assert_frequencies(draws, expected)


def test_same_seed_same_draws_and_different_seeds_differ():
    logits = _logits(v=1000)
    params = SamplingParams.make(temperature=1.0, top_p=0.95)
    a, b, c = (_draw(logits, params, n=32, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_changing_params_does_not_recompile():
    traces = []

    def traced(logits, key, params):
        traces.append(1)
        return sample(logits, key, params)

    fn = jax.jit(traced)
    logits = jnp.asarray(_logits(v=100))
    key = jax.random.key(0)
    for params in (SamplingParams.make(0.5, 3, 0.9, 0.1), SamplingParams.make(1.0), SamplingParams.make(2.0, 0, 0.5)):
        fn(logits, key, params)
    assert len(traces) == 1
    # Greedy is its own program (a plain argmax), compiled once.
    for params in (SamplingParams.greedy(), SamplingParams.make(0.0, 7, 0.3)):
        fn(logits, key, params)
    assert len(traces) == 2


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2)]
)
def test_out_of_range_values_are_user_errors(kwargs):
    with pytest.raises(UserError):
        SamplingParams.make(**kwargs)
