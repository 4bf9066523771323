"""The transformer as pure functions over the weights pytree and a KV cache.

`forward(weights, cache, tokens, positions, cfg=...)` runs S tokens of one
sequence (a prefill chunk or a single decode token) and returns the logits of
every token plus the updated cache. The cache is a functional state: callers
donate it to their jitted step and keep the returned one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from yalm_jax import ops
from yalm_jax.config import ModelConfig
from yalm_jax.weights import LayerWeights, Weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per layer, keys and values of shape (n_kv_heads, max_context, head_dim).

    Slot t holds position t. Slots that no token has written yet are never read,
    because a query at position p attends only to slots <= p.
    """

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def max_context(self) -> int:
        return self.k[0].shape[1]


def init_cache(cfg: ModelConfig, max_context: int, dtype: str | None = None) -> KVCache:
    shape = (cfg.n_kv_heads, max_context, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return KVCache(
        k=[jnp.zeros(shape, dt) for _ in range(cfg.n_layers)],
        v=[jnp.zeros(shape, dt) for _ in range(cfg.n_layers)],
    )


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding in transformers' half-split layout; x: (S, heads, head_dim)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(cfg.rope_inv_freq())[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_block(x, layer: LayerWeights, k_cache, v_cache, positions, cfg: ModelConfig, attn_len, backend):
    """x + attention(rms_norm(x)); the norm and the residual add fuse into the projections."""
    s = x.shape[0]
    qkv = ops.linear(x, layer.wqkv, layer.bqkv, norm=(layer.attn_norm, cfg.norm_eps), backend=backend)
    q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
    q = rope(q.reshape(s, cfg.n_heads, cfg.head_dim), positions, cfg)
    k = rope(k.reshape(s, cfg.n_kv_heads, cfg.head_dim), positions, cfg)
    v = v.reshape(s, cfg.n_kv_heads, cfg.head_dim)
    out, k_cache, v_cache = ops.attention(
        q, k, v, k_cache, v_cache, positions, attn_len=attn_len, window=cfg.sliding_window, backend=backend
    )
    return ops.linear(out.reshape(s, cfg.q_dim), layer.wo, residual=x, backend=backend), k_cache, v_cache


def ffn_block(x, layer: LayerWeights, cfg: ModelConfig, backend):
    """x + w2 (silu(w1 rms_norm(x)) * w3 rms_norm(x))."""
    h = ops.gated_ffn_up(x, layer.w13, norm=(layer.ffn_norm, cfg.norm_eps), backend=backend)
    return ops.linear(h, layer.w2, residual=x, backend=backend)


def forward_hidden(
    weights: Weights,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    cfg: ModelConfig,
    attn_len: int | None = None,
    backend: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """Final-normed hidden states (S, dim) of `tokens` at `positions`, and the new cache."""
    attn_len = attn_len or cache.max_context
    x = weights.embed[tokens]
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(weights.layers, cache.k, cache.v):
        with jax.named_scope("attention"):
            x, k_cache, v_cache = attention_block(x, layer, k_cache, v_cache, positions, cfg, attn_len, backend)
        with jax.named_scope("ffn"):
            x = ffn_block(x, layer, cfg, backend)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return ops.rms_norm(x, weights.final_norm, cfg.norm_eps), KVCache(k=new_k, v=new_v)


def logits_from_hidden(weights: Weights, h: jax.Array, *, backend: str = "xla") -> jax.Array:
    return ops.linear(h, weights.output, backend=backend).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "backend"), donate_argnames=("cache",))
def forward(
    weights: Weights,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    cfg: ModelConfig,
    attn_len: int | None = None,
    backend: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """Logits (S, vocab) in f32 for `tokens` (S,) at `positions` (S,), and the new cache.

    Pure: jit it, scan it, or call it as it is (it is jitted with the cache donated).
    `positions` must be consecutive, start + arange(S), with start + S <= the
    cache's max_context; pad a short chunk by continuing the positions: a pad
    token's key lands in a slot past the real tokens, which attention never
    reads before a real token overwrites it. `attn_len` (static) bounds how
    many cache slots attention reads; it must be >= positions[0].
    """
    h, cache = forward_hidden(weights, cache, tokens, positions, cfg=cfg, attn_len=attn_len, backend=backend)
    return logits_from_hidden(weights, h, backend=backend), cache
