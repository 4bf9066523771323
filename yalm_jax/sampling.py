"""Choosing the next token from a row of logits.

`sample(logits, key, params)` is pure and jittable. `SamplingParams` is a
pytree of scalar arrays, so changing the temperature or a cutoff between calls
never recompiles. The filters follow transformers' logits warpers, applied in
the same order: temperature, top-k, top-p (nucleus), min-p.

Cost on the CPU matters at batch 1: a full sort of a 49152-token vocabulary
takes about 9 ms, longer than the rest of a small model's step. So greedy is a
plain argmax; sampling without top-k/top-p needs no sort at all; and top-k or
top-p look only at the `cap` largest logits (`lax.top_k`, a fraction of a
millisecond) whenever that provably holds every token they could keep. Only a
top-p nucleus wider than `cap` tokens, or a top-k above `cap`, pays the sort.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from yalm_jax.errors import UserError

# How many of the largest logits the fast top-k / top-p path looks at.
DEFAULT_CAP = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """Scalar f32/i32 arrays. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 mean off.

    `is_greedy` is static, so a greedy program is a plain argmax: a run-time switch
    between argmax and sampling stalls a GPU every step (7-12% of SmolLM2's
    decode on an H100). Changing any other value never recompiles.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    is_greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def make(
        cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
    ) -> "SamplingParams":
        """Checked constructor; raises UserError for values outside their range."""
        check_sampling_values(temperature, top_k, top_p, min_p)
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            top_p=jnp.asarray(top_p, jnp.float32),
            min_p=jnp.asarray(min_p, jnp.float32),
            is_greedy=temperature == 0,
        )

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls.make()


def check_sampling_values(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if not temperature >= 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not top_k >= 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise UserError(f"min_p must be in [0, 1], got {min_p}")


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, *, cap: int = DEFAULT_CAP) -> jax.Array:
    """One token id (int32 scalar) drawn from `logits` (V,) under `params`."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    cap = min(cap, vocab)

    def greedy():
        return jnp.argmax(logits).astype(jnp.int32)

    def sampled():
        x = logits / params.temperature
        k_active = (params.top_k > 0) & (params.top_k < vocab)
        p_active = params.top_p < 1
        top_vals, top_idx = lax.top_k(x, cap)
        lse = jax.nn.logsumexp(x)
        cap_mass = jnp.sum(jnp.exp(top_vals - lse))
        # 0: no top-k/top-p, so no sort; 1: the `cap` largest hold every kept token; 2: full sort.
        fits_cap = jnp.where(k_active, params.top_k <= cap, cap_mass >= params.top_p)
        branch = jnp.where(~k_active & ~p_active, 0, jnp.where(fits_cap, 1, 2))

        def unsorted():
            keep = x - jnp.max(x) >= jnp.log(params.min_p)
            return jax.random.categorical(key, jnp.where(keep, x, -jnp.inf)).astype(jnp.int32)

        def from_sorted(vals, idx):
            vals = _filter_sorted(vals, lse, k_active, params)
            return idx[jax.random.categorical(key, vals)].astype(jnp.int32)

        def capped():
            return from_sorted(top_vals, top_idx)

        def full_sort():
            neg, idx = lax.sort((-x, lax.iota(jnp.int32, vocab)), num_keys=1)
            return from_sorted(-neg, idx)

        return lax.switch(branch, (unsorted, capped, full_sort))

    return greedy() if params.is_greedy else sampled()


def _filter_sorted(vals: jax.Array, lse: jax.Array, k_active: jax.Array, params: SamplingParams) -> jax.Array:
    """Top-k, then top-p, then min-p over `vals` sorted descending; removed entries become -inf.

    `lse` is the log-normaliser of the whole (unfiltered) distribution; `vals`
    may be only its largest entries, as long as they include every kept token.
    """
    n = vals.shape[0]
    # Top-k: keep every value >= the k-th largest (ties included, as transformers does).
    kth = vals[jnp.clip(params.top_k, 1, n) - 1]
    vals = jnp.where(k_active & (vals < kth), -jnp.inf, vals)
    norm = jnp.where(k_active, jax.nn.logsumexp(vals), lse)
    probs = jnp.exp(vals - norm)
    # Top-p: keep the smallest prefix whose mass reaches top_p (a token stays if the mass before it < p).
    mass_before = jnp.cumsum(probs) - probs
    keep = (mass_before < params.top_p) | (params.top_p >= 1)
    # Min-p: keep probabilities >= min_p * the largest one; renormalising leaves this ratio unchanged.
    keep &= vals - vals[0] >= jnp.log(params.min_p)
    keep = keep.at[0].set(True)
    return jnp.where(keep, vals, -jnp.inf)
