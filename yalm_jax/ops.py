"""The seam between the model's math and the kernels that run it.

The model calls `linear`, `rms_norm` and `attention` from here and nowhere
else. `backend="xla"` lowers them to plain jnp, which XLA compiles for the CPU
or the GPU; `backend="pallas"` sends batch-1 decode (one token) through the
hand-written GPU kernels in `pallas_kernels/`. Prefill chunks are matrix
products, which XLA already does well, so they stay on XLA either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "pallas")


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in f32 like transformers."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, backend: str = "xla") -> jax.Array:
    """x @ w.T (+ b) for x of shape (S, in) and w of shape (out, in)."""
    y = jnp.einsum("si,oi->so", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y if b is None else y + b


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_pos: jax.Array,
    *,
    attn_len: int,
    window: int | None,
    backend: str = "xla",
) -> jax.Array:
    """Causal attention of S queries over the first `attn_len` slots of the cache.

    q: (S, n_heads, head_dim); k_cache, v_cache: (n_kv_heads, T, head_dim), where
    slot t holds position t. A query at position p sees slots t <= p (and
    t > p - window with a sliding window). Returns (S, n_heads, head_dim).
    """
    s, n_heads, hd = q.shape
    n_kv = k_cache.shape[0]
    k = k_cache[:, :attn_len]
    v = v_cache[:, :attn_len]
    qg = q.reshape(s, n_kv, n_heads // n_kv, hd)
    scores = jnp.einsum("skgd,ktd->kgst", qg, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    k_pos = jnp.arange(attn_len)
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("kgst,ktd->skgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(s, n_heads, hd).astype(q.dtype)
