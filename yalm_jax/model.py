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
from jax.sharding import PartitionSpec as P

from yalm_jax import ops, parallel
from yalm_jax.config import ModelConfig
from yalm_jax.weights import LayerWeights, Weights


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=["ring_sinks"])
@dataclasses.dataclass
class KVCache:
    """Per layer, keys and values of shape (n_kv_heads, max_context, head_dim).

    The layout is static (part of the pytree's structure, so jit specialises on it):
    with `ring_sinks` None, slot t holds position t, and slots that no token has
    written yet are never read, because a query at position p attends only to
    slots <= p. With `ring_sinks` an int, the cache is a ring with that many
    attention sinks (StreamingLLM; ops.ring_attention): positions run past
    max_context, which is then the attention window in tokens.
    """

    k: list[jax.Array]
    v: list[jax.Array]
    ring_sinks: int | None = None

    @property
    def max_context(self) -> int:
        return self.k[0].shape[1]


def init_cache(cfg: ModelConfig, max_context: int, dtype: str | None = None, ring_sinks: int | None = None) -> KVCache:
    """Zeroed caches; with cfg.tp > 1 each layer's is split by kv head over the devices (parallel.py).

    `ring_sinks` (an int) makes it a ring of max_context slots with that many attention sinks.
    """
    if ring_sinks is not None and not 0 <= ring_sinks < max_context:
        raise ValueError(f"ring_sinks={ring_sinks} must be in [0, max_context={max_context})")
    shape = (parallel.cache_heads(cfg), max_context, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    device = parallel.cache_sharding(cfg) if cfg.tp > 1 else None
    return KVCache(
        k=[jnp.zeros(shape, dt, device=device) for _ in range(cfg.n_layers)],
        v=[jnp.zeros(shape, dt, device=device) for _ in range(cfg.n_layers)],
        ring_sinks=ring_sinks,
    )


@functools.partial(jax.jit, static_argnames=("slots",))
def grow_cache(cache: KVCache, slots: int) -> KVCache:
    """The cache with `slots` slots: the same positions in the same slots, and zeroed room past them.
    Not for a ring, whose slots' meaning depends on their count."""
    if cache.ring_sinks is not None:
        raise ValueError("a ring cache cannot grow")
    grow = lambda x: jnp.pad(x, ((0, 0), (0, slots - x.shape[1]), (0, 0)))  # noqa: E731
    return KVCache(k=[grow(x) for x in cache.k], v=[grow(x) for x in cache.v])


def attention_block(
    x, layer: LayerWeights, k_cache, v_cache, split_counter, positions, cfg: ModelConfig, attn_len, backend,
    i: int | None = None, ring_sinks: int | None = None,
):  # fmt: skip
    """x + attention(rms_norm(x)) for layer i; the norm and the residual add fuse into the projections.

    Returns it, the FFN's input as `ffn_block` takes it (it again, or its normed int8 form:
    ops.linear_for_next), the layer's new caches and `split_counter` (ops.attention's scratch, for the next
    layer).

    With cfg.qk_norm each head's query and key are RMS-normed before rope; with
    cfg.post_norms the attention output is RMS-normed before the residual add.
    With `ring_sinks` (a ring cache, see KVCache) the sink slots are scored
    against the query rotated at its position within the cache.
    """
    qkv = ops.linear(x, layer.wqkv, layer.bqkv, norm=(layer.attn_norm, cfg.norm_eps), backend=backend)
    qk_norm = (layer.q_norm, layer.k_norm, cfg.norm_eps) if cfg.qk_norm else None
    window = cfg.sliding_window if i is None else cfg.layer_window(i)
    out, k_cache, v_cache, split_counter = ops.attention(
        qkv, k_cache, v_cache, positions, split_counter, n_heads=cfg.n_heads, rope_inv_freq=cfg.rope_inv_freq(i),
        qk_norm=qk_norm, attn_len=attn_len, window=window, scale=cfg.attn_scale, ring_sinks=ring_sinks,
        backend=backend,
    )  # fmt: skip
    if cfg.post_norms:
        y = ops.linear(out, layer.wo, reduce_axis=cfg.tp_axis, backend=backend)
        y = x + ops.rms_norm(y, layer.attn_post_norm, cfg.norm_eps)
        return y, y, k_cache, v_cache, split_counter
    y, ffn_in = ops.linear_for_next(
        out, layer.wo, residual=x, next_w=None if cfg.is_moe else layer.w13, next_norm=(layer.ffn_norm, cfg.norm_eps),
        reduce_axis=cfg.tp_axis, backend=backend,
    )  # fmt: skip
    return y, ffn_in, k_cache, v_cache, split_counter


def route(x: jax.Array, router: jax.Array, k: int, backend: str) -> tuple[jax.Array, jax.Array]:
    """The k experts of each token and their weights, as transformers' Mixtral router picks them:
    softmax over all experts in f32, the top k, renormalised to sum to 1. x: (S, dim), normed."""
    probs = jax.nn.softmax(ops.linear(x, router, backend=backend).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    return experts, weights / jnp.sum(weights, axis=-1, keepdims=True)


def ffn_block(x, layer: LayerWeights, cfg: ModelConfig, backend, x_in=None):
    """x + w2 (act(w1 rms_norm(x)) * w3 rms_norm(x)), or the mixture of the routed experts' FFNs.

    `x_in` is x as w13's kernel takes it (attention_block's second result: x, or rms_norm(x) rounded to int8
    by wo's kernel); None: x. With cfg.post_norms the FFN output is RMS-normed before the residual add.
    """
    if cfg.is_moe:
        xn = ops.rms_norm(x, layer.ffn_norm, cfg.norm_eps)
        experts, weights = route(xn, layer.router, cfg.n_experts_per_tok, backend)
        y = ops.moe_ffn(
            xn, layer.w13, layer.w2, experts, weights,
            activation=cfg.activation, reduce_axis=cfg.tp_axis, backend=backend,
        )  # fmt: skip
        return x + y
    h = ops.gated_ffn_up(
        x if x_in is None else x_in, layer.w13, norm=(layer.ffn_norm, cfg.norm_eps), activation=cfg.activation,
        next_w=layer.w2, backend=backend,
    )  # fmt: skip
    if cfg.post_norms:
        y = ops.linear(h, layer.w2, reduce_axis=cfg.tp_axis, backend=backend)
        return x + ops.rms_norm(y, layer.ffn_post_norm, cfg.norm_eps)
    return ops.linear(h, layer.w2, residual=x, reduce_axis=cfg.tp_axis, backend=backend)


def f32_products(dtype: str):
    """A context for tracing the model's XLA matrix products: full f32 ones for an f32 model.

    XLA:GPU would otherwise run f32 products as TF32 (operands rounded to 10 mantissa bits, which put a
    prefill's logits 5e-4 off the CPU's); the CPU's f32 products are full precision either way, and the
    setting leaves bf16/f16 ones as they are.
    """
    return jax.default_matmul_precision("highest" if jnp.dtype(dtype) == jnp.float32 else "default")


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
    if cfg.tp > 1 and cfg.tp_axis is None:  # tensor parallel: each device runs its shard (parallel.py)
        spec = [parallel.cache_spec()] * cfg.n_layers
        cache_specs = KVCache(k=spec, v=spec, ring_sinks=cache.ring_sinks)
        return jax.shard_map(
            functools.partial(forward_hidden, cfg=cfg.shard(), attn_len=attn_len, backend=backend),
            mesh=parallel.mesh(cfg.tp),
            in_specs=(parallel.weight_specs(cfg, weights), cache_specs, P(), P()),
            out_specs=(P(), cache_specs),
            check_vma=False,  # pallas_call outputs carry no varying-axes type (its spelling differs across jax versions)
        )(weights, cache, tokens, positions)
    with f32_products(cfg.dtype):
        return _hidden_states(weights, cache, tokens, positions, cfg, attn_len, backend)


def _hidden_states(weights: Weights, cache: KVCache, tokens, positions, cfg: ModelConfig, attn_len: int, backend):
    """forward_hidden on one device (or inside shard_map, on its shard)."""
    x = ops.embed(weights.embed, tokens, reduce_axis=cfg.tp_axis if parallel.vocab_sharded(cfg) else None)
    if cfg.embed_scale is not None:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)  # rounded to the compute dtype first, as transformers does
    new_k, new_v = [], []
    split_counter = ops.new_split_counter(cache.k[0])  # one for all layers: the kernels leave it zeroed
    for i, (layer, k_cache, v_cache) in enumerate(zip(weights.layers, cache.k, cache.v)):
        with jax.named_scope("attention"):
            x, ffn_in, k_cache, v_cache, split_counter = attention_block(
                x, layer, k_cache, v_cache, split_counter, positions, cfg, attn_len, backend, i, cache.ring_sinks
            )
        with jax.named_scope("ffn"):
            x = ffn_block(x, layer, cfg, backend, ffn_in)
        new_k.append(k_cache)
        new_v.append(v_cache)
    return ops.rms_norm(x, weights.final_norm, cfg.norm_eps), KVCache(k=new_k, v=new_v, ring_sinks=cache.ring_sinks)


def logits_from_hidden(
    weights: Weights, h: jax.Array, *, cfg: ModelConfig | None = None, backend: str = "xla"
) -> jax.Array:
    """f32 logits of final-normed hidden states; soft-capped when cfg.final_softcap is set.

    With cfg.tp > 1 the logits come out split over the vocabulary (when tp divides it).
    """
    cap = cfg.final_softcap if cfg is not None else None

    def logits(w, h):
        with f32_products(h.dtype):
            y = ops.linear(h, w, backend=backend).astype(jnp.float32)
        return y if cap is None else cap * jnp.tanh(y / cap)

    if cfg is None or cfg.tp == 1 or cfg.tp_axis is not None:
        return logits(weights.output, h)
    field = "embed" if weights.lm_head is None else "lm_head"
    rows = parallel.spec(cfg, field, 2)[:1]
    return jax.shard_map(
        logits, mesh=parallel.mesh(cfg.tp), in_specs=(parallel.field_spec(cfg, field, weights.output), P()),
        out_specs=P(None, *rows), check_vma=False,
    )(weights.output, h)  # fmt: skip


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
    many cache slots attention reads; it must be >= positions[0]. A ring cache
    (KVCache.ring_sinks) takes any positions, but a chunk must not wrap the
    ring and must not be padded (ops.ring_attention).
    """
    h, cache = forward_hidden(weights, cache, tokens, positions, cfg=cfg, attn_len=attn_len, backend=backend)
    return logits_from_hidden(weights, h, cfg=cfg, backend=backend), cache
