"""The seam between the model's math and the kernels that run it.

The model calls `linear`, `rms_norm` and `attention` from here and nowhere
else. `backend="xla"` lowers them to plain jnp, which XLA compiles for the CPU
or the GPU; `backend="pallas"` sends batch-1 decode (one token) through the
hand-written GPU kernels in `pallas_kernels/`. A prefill chunk's projections
are matrix products, which XLA already does well, so they stay on XLA either
way; its attention goes through a Pallas flash-attention kernel on the pallas
backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention as _attn
from pallas_kernels import gemv as _gemv
from pallas_kernels import gemv_quant as _gemv_quant
from pallas_kernels import prefill_attention as _prefill
from yalm_jax import quant

BACKENDS = ("xla", "pallas")


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in f32 like transformers."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _decode(x: jax.Array | quant.Int8Vector, backend: str) -> bool:
    """Whether this call goes to the Pallas kernels: one token (batch-1 decode) on the pallas backend, or an
    Int8Vector, which only those kernels make."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return isinstance(x, quant.Int8Vector) or (backend == "pallas" and x.shape[0] == 1)


def _interpret() -> bool:
    # Off the GPU the kernels run in Pallas' interpreter (slow; for tests at small shapes).
    return jax.default_backend() != "gpu"


def linear(
    x: jax.Array | quant.Int8Vector,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    reduce_axis: str | None = None,
    backend: str = "xla",
) -> jax.Array:
    """x @ w.T (+ b) (+ residual) for x of shape (S, in) and w of shape (out, in).

    With `norm=(weight, eps)`, x is replaced by rms_norm(x, weight, eps) first;
    the Pallas GEMV fuses that norm, the bias and the residual add into one pass.
    With `reduce_axis` (inside shard_map, tensor parallelism), x and w hold this
    device's slice of the input features: the partial products are summed over
    that mesh axis, in f32, before b and the residual are added.

    x may be one token's quant.Int8Vector (from `gated_ffn_up`'s `next_w`, or `linear_for_next`'s, which
    brings its norm), for w's decode kernel to read.
    """
    if reduce_axis is not None:
        # Each device's partial product, summed over the axis in f32 (the kernels write it so: no conversion).
        y = jax.lax.psum(_product(x, w, norm, backend, jnp.float32), reduce_axis)
        y = y if b is None else y + b
        return y.astype(_out_dtype(x, w)) if residual is None else (residual + y).astype(residual.dtype)
    if _decode(x, backend):
        return _decode_gemv(w, x, norm, bias=b, residual=None if residual is None else residual[0])
    y = _product(x, w, norm, backend)
    y = y if b is None else y + b
    return y if residual is None else residual + y


def _out_dtype(x: jax.Array | quant.Int8Vector, w):
    """A product's dtype: x's, or for an Int8Vector (which stands for x in w's compute dtype) w's."""
    return jnp.dtype(w.dtype) if isinstance(x, quant.Int8Vector) else x.dtype


def _product(x: jax.Array | quant.Int8Vector, w, norm, backend: str, dtype=None) -> jax.Array:
    """x @ w.T, x normed first, in `dtype` (default the product's: x's): a decoded token's through its GEMV
    kernel, a chunk's on XLA (a quantized w dequantized inside the graph, quant.py)."""
    if _decode(x, backend):
        return _decode_gemv(w, x, norm, out_dtype=dtype)
    if quant.is_quantized(w) and w.int8_activations:  # the norm is part of the rounding (quant.round_activations)
        xn = quant.round_activations(x, norm)
    else:
        xn = x if norm is None else rms_norm(x, *norm)
    if quant.is_quantized(w):
        return quant.matmul(xn, w).astype(dtype or x.dtype)
    return jnp.einsum("si,oi->so", xn, w, preferred_element_type=jnp.float32).astype(dtype or x.dtype)


def embed(table: jax.Array, tokens: jax.Array, *, reduce_axis: str | None = None) -> jax.Array:
    """The rows of `table` for `tokens` (S,).

    With `reduce_axis` (inside shard_map), `table` is this device's contiguous
    slice of the vocabulary: it looks up the tokens it holds, zeros the rest,
    and the psum over the axis assembles every row (exactly: one term is nonzero).
    """
    if reduce_axis is None:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(reduce_axis) * rows
    mine = (local >= 0) & (local < rows)
    x = jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], jnp.zeros((), table.dtype))
    return jax.lax.psum(x, reduce_axis)


def _gemv_for(w):
    """The decode GEMV kernel for w: dense, or dequantizing in the kernel for a quant.QuantizedMatrix."""
    return _gemv_quant.gemv_quant if quant.is_quantized(w) else _gemv.gemv


def _kernel_input(x: jax.Array | quant.Int8Vector, norm):
    """A decoded token's (1, in) x and its norm as a GEMV kernel takes them: x[0] and the norm to fuse, or an
    Int8Vector as it is, without the norm where it brings it (its producer applied that norm)."""
    if not isinstance(x, quant.Int8Vector):
        return x[0], norm
    if x.sumsq is None:
        return x, norm
    if norm is None or norm[1] != x.eps:
        raise ValueError("a normed Int8Vector goes where its producer's norm (next_norm) applies")
    return x, None


def _decode_gemv(w, x: jax.Array | quant.Int8Vector, norm, **kw) -> jax.Array:
    """One token's (1, in) product with w through its GEMV kernel, the norm fused (and for a matrix with
    int8_activations, the rounding of x too, unless x comes rounded: an Int8Vector)."""
    x, norm = _kernel_input(x, norm)
    return _gemv_for(w)(w, x, norm=norm, interpret=_interpret(), **kw)[None]


def linear_for_next(
    x: jax.Array,
    w,
    *,
    residual: jax.Array,
    next_w,
    next_norm: tuple[jax.Array, float],
    reduce_axis: str | None = None,
    backend: str = "xla",
) -> tuple[jax.Array, jax.Array | quant.Int8Vector]:
    """linear(x, w, residual=residual, reduce_axis=reduce_axis) = y, and y as the next matrix's kernel takes
    it: next_w (None: no matrix) multiplies rms_norm(y, *next_norm). For a decoded token where that pays
    (gemv_quant.rounds_output_for), w's kernel also writes rms_norm(y) rounded to int8 (a quant.Int8Vector,
    to pass to next_w's `linear` or `gated_ffn_up` with the same `norm`), so next_w's kernel neither norms nor
    rounds y in every program; otherwise the second result is y itself."""
    if reduce_axis is None and _decode(x, backend) and _gemv_quant.rounds_output_for(w, next_w):
        y, y_int8 = _gemv_quant.gemv_quant(
            w, x[0], residual=residual[0], int8_out=True, norm_out=next_norm, interpret=_interpret()
        )
        return y[None], y_int8
    y = linear(x, w, residual=residual, reduce_axis=reduce_axis, backend=backend)
    return y, y


def activate(x: jax.Array, activation: str) -> jax.Array:
    """The gated FFN's activation: "silu", or "gelu_tanh" (GELU's tanh approximation, as Gemma uses)."""
    if activation == "silu":
        return jax.nn.silu(x)
    if activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {activation!r}")


def gated_ffn_up(
    x: jax.Array,
    w13: jax.Array,
    *,
    norm: tuple[jax.Array, float] | None = None,
    activation: str = "silu",
    next_w=None,
    backend: str = "xla",
) -> jax.Array | quant.Int8Vector:
    """act(x @ w_gate.T) * (x @ w_up.T), for w13 holding gate rows then up rows (2 * hidden, in).

    `next_w` is the matrix that multiplies the result next. Where it takes int8 activations and that pays
    (gemv_quant.rounds_output_for), a decoded token's result comes as a quant.Int8Vector, rounded by w13's
    kernel as it writes it, so next_w's kernel does not round it again in every program. x may be one too
    (`linear_for_next`'s, normed with `norm`).
    """
    if _decode(x, backend):
        if _gemv_quant.rounds_output_for(w13, next_w, gated=True):
            x, norm = _kernel_input(x, norm)
            return _gemv_quant.gemv_quant(
                w13, x, norm=norm, gated=True, activation=activation, int8_out=True, interpret=_interpret()
            )[1]
        return _decode_gemv(w13, x, norm, gated=True, activation=activation)
    gate, up = jnp.split(linear(x, w13, norm=norm), 2, axis=-1)
    return activate(gate, activation) * up


def moe_ffn(
    x: jax.Array,
    w13: jax.Array,
    w2: jax.Array,
    experts: jax.Array,
    expert_weights: jax.Array,
    *,
    activation: str = "silu",
    reduce_axis: str | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Each token's mixture sum_j expert_weights[s, j] * ffn_{experts[s, j]}(x[s]), for x of shape (S, dim).

    w13: (n_experts, 2 * hidden, dim), each expert's gate rows then up rows; w2:
    (n_experts, dim, hidden); experts: (S, k) int32, the chosen experts;
    expert_weights: (S, k) f32. One token (decode) reads only its k experts'
    weights, gathered by index: k / n_experts of the expert bytes. A chunk of
    tokens runs every expert on every token and weights the outputs, zero for
    the experts a token did not choose: matrix products instead of gathers.
    With `reduce_axis` (inside shard_map), w13 and w2 hold this device's slice
    of every expert's hidden dim; the partial mixtures are summed over that
    mesh axis in f32.
    """
    del backend  # one jnp path for now; a Pallas kernel for decode would go here
    f32 = jnp.float32
    if x.shape[0] == 1:
        w13_k = jnp.take(w13, experts[0], axis=0)  # (k, 2 * hidden, dim)
        w2_k = jnp.take(w2, experts[0], axis=0)  # (k, dim, hidden)
        h = jnp.einsum("sd,khd->skh", x, w13_k, preferred_element_type=f32).astype(x.dtype)
        gate, up = jnp.split(h, 2, axis=-1)
        y = jnp.einsum("skh,kdh->skd", activate(gate, activation) * up, w2_k, preferred_element_type=f32)
        return _psum(jnp.einsum("skd,sk->sd", y, expert_weights.astype(f32)), reduce_axis).astype(x.dtype)
    h = jnp.einsum("sd,ehd->seh", x, w13, preferred_element_type=f32).astype(x.dtype)
    gate, up = jnp.split(h, 2, axis=-1)
    y = jnp.einsum("seh,edh->sed", activate(gate, activation) * up, w2, preferred_element_type=f32)
    dense = jnp.sum(jax.nn.one_hot(experts, w13.shape[0], dtype=f32) * expert_weights[..., None].astype(f32), axis=1)
    return _psum(jnp.einsum("sed,se->sd", y, dense), reduce_axis).astype(x.dtype)


def _psum(x: jax.Array, axis: str | None) -> jax.Array:
    return x if axis is None else jax.lax.psum(x, axis)


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes new (S, n_kv_heads, head_dim) into slots positions[0] .. positions[0] + S - 1.

    A plain dynamic-update-slice, which XLA does in place; a scatter (or a
    masked write) makes it copy the whole cache. The slice is clamped to fit
    the cache, so callers keep positions[0] + S <= max_context.
    """
    return jax.lax.dynamic_update_slice(cache, new.swapaxes(0, 1).astype(cache.dtype), (0, positions[0], 0))


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in transformers' half-split layout; x: (S, heads, head_dim), inv_freq: (head_dim // 2,)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(
    qkv: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_pos: jax.Array,
    split_counter: jax.Array | None = None,
    *,
    n_heads: int,
    rope_inv_freq: np.ndarray,
    qk_norm: tuple[jax.Array, jax.Array, float] | None = None,
    attn_len: int,
    window: int | None,
    scale: float | None = None,
    ring_sinks: int | None = None,
    backend: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Causal attention of a chunk of S consecutive tokens; writes the chunk into the cache.

    qkv: (S, (n_heads + 2 n_kv) * head_dim), the fused projection's output: each
    token's query heads, key heads, then value heads. Queries and keys come as
    projected: each head is RMS-normed first when `qk_norm` = (q_weight,
    k_weight, eps), then rotated at its position (`rope` with `rope_inv_freq`).
    k_cache, v_cache: (n_kv_heads, T, head_dim), holding position t in slot t.
    q_pos: (S,), ascending from q_pos[0], the chunk's start; cache slots from
    the start on are stale and never read. A query at position p sees keys at
    positions <= p (and > p - window with a sliding window). The xla path reads
    only the first `attn_len` slots; the pallas path (a decode kernel for one
    token, a flash-attention kernel for a chunk) only the slots up to the chunk's end. Scores are q.k * scale (default
    head_dim ** -0.5). Returns the output (S, n_heads * head_dim), the
    updated caches and `split_counter`: the decode kernel's zeroed scratch
    (`new_split_counter`), which callers thread through the layers so that it is
    made once a step; the other paths pass it through.

    With `ring_sinks` set, the cache is a ring with that many attention sinks
    instead (see `ring_attention`).
    """
    s = qkv.shape[0]
    n_kv, max_context, hd = k_cache.shape
    if ring_sinks is None and _decode(qkv, backend) and _attn.supported(max_context, hd):
        # One kernel normalises and rotates q and k, reads the cache blocks below q_pos (attn_len picks
        # only its tile), adds the new token and writes it into slot q_pos in place.
        out, k_cache, v_cache, split_counter = _attn.decode_attention_update(
            qkv[0].reshape(-1, hd), k_cache, v_cache, q_pos[0], split_counter, n_heads=n_heads,
            rope_inv_freq=rope_inv_freq, qk_norm=qk_norm, window=window, scale=scale,
            attn_len=attn_len, interpret=_interpret(),
        )  # fmt: skip
        return out.reshape(1, n_heads * hd), k_cache, v_cache, split_counter
    heads = qkv.reshape(s, n_heads + 2 * n_kv, hd)
    q, k, v = heads[:, :n_heads], heads[:, n_heads : n_heads + n_kv], heads[:, n_heads + n_kv :]
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm[0], qk_norm[2]), rms_norm(k, qk_norm[1], qk_norm[2])
    if ring_sinks is not None:
        out, k_cache, v_cache = ring_attention(
            q, k, v, k_cache, v_cache, q_pos, rope_inv_freq=rope_inv_freq, sinks=ring_sinks, attn_len=attn_len,
            window=window, scale=scale,
        )  # fmt: skip
        return out.reshape(s, n_heads * hd), k_cache, v_cache, split_counter
    q, k = rope(q, q_pos, rope_inv_freq), rope(k, q_pos, rope_inv_freq)
    if backend == "pallas" and _prefill.supported(max_context, hd):
        # A chunk: written into the cache first, then one flash-attention kernel reads it (slots up to
        # the chunk's last position only), never materialising the scores.
        k_cache, v_cache = write_cache(k_cache, k, q_pos), write_cache(v_cache, v, q_pos)
        out = _prefill.prefill_attention(q, k_cache, v_cache, q_pos[0], window=window, scale=scale,
                                         interpret=_interpret())  # fmt: skip
        return out.reshape(s, n_heads * hd), k_cache, v_cache, split_counter
    # Attend over the cache as it was plus the chunk itself, then write the chunk:
    # reading the cache after the write makes XLA fuse the write into the read
    # and copy every layer's whole cache on every step to keep both alive.
    slot = jnp.arange(attn_len)
    k_pos = jnp.concatenate([jnp.where(slot < q_pos[0], slot, jnp.iinfo(jnp.int32).max), q_pos])
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    out = _attend(q, k, v, k_cache, v_cache, visible, attn_len=attn_len, scale=scale)
    return (out.reshape(s, n_heads * hd), *_write_after_read(out, k, v, k_cache, v_cache, q_pos[0]), split_counter)


def new_split_counter(k_cache: jax.Array) -> jax.Array:
    """The scratch `attention` takes and returns, for a cache of k_cache's shape (see decode_attention)."""
    return _attn.new_split_counter(k_cache.shape[0])


def attention_dtype(q_dtype, cache_dtype) -> jnp.dtype:
    """The dtype the XLA path's attention multiplies in (always accumulating in f32).

    f32 on the CPU, where XLA has no bf16 x bf16 -> f32 product and is slow at
    16-bit ones anyway, and for an f32 query or cache (the kernels keep an f32
    query exact over a narrower cache too); else the cache's 16-bit dtype (bf16
    for an fp8 cache).
    """
    if jax.default_backend() == "cpu" or jnp.float32 in (jnp.dtype(q_dtype), jnp.dtype(cache_dtype)):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(cache_dtype if cache_dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16)


def _attend(q, k, v, k_cache, v_cache, visible, *, attn_len, scale, q_sink=None, sinks=0):
    """softmax(q.k * scale over the `visible` keys) . v, the keys being the first `attn_len`
    cache slots then the chunk's own; the first `sinks` slots are scored against `q_sink`.

    The cache and the chunk are multiplied apart and only their scores joined: joining the cache's slots to
    the chunk's keys and values copied them every step. Each kv head's queries are the rows of one batched
    product, (kv heads, group x S, head_dim) against the cache's (kv heads, slots, head_dim) as it lies, where
    XLA CPU ran 4-d operands several times slower (BENCHMARKS.md, CPU).
    """
    s, n_heads, hd = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    dt, f32 = attention_dtype(q.dtype, k_cache.dtype), jnp.float32
    scale = hd**-0.5 if scale is None else scale
    by_head = (((2,), (2,)), ((0,), (0,)))  # (kv, rows, hd) x (kv, keys, hd) -> (kv, rows, keys)
    mix = (((2,), (1,)), ((0,), (0,)))  # (kv, rows, keys) x (kv, keys, hd) -> (kv, rows, hd)

    def rows(queries):  # (S, n_heads, hd) -> (kv, group * S, hd), rows ordered (group, S)
        return queries.astype(dt).reshape(s, n_kv, group, hd).transpose(1, 2, 0, 3).reshape(n_kv, group * s, hd)

    def scores_of(queries, keys):
        return jax.lax.dot_general(rows(queries), keys.astype(dt), by_head, preferred_element_type=f32) * scale

    # The chunk's own keys and values as the cache stores them, as the kernels (which read them back)
    # and every later step see them.
    k_own, v_own = k.swapaxes(0, 1).astype(k_cache.dtype), v.swapaxes(0, 1).astype(v_cache.dtype)
    cached = scores_of(q, k_cache[:, :attn_len])
    if sinks:
        cached = jnp.concatenate([scores_of(q_sink, k_cache[:, :sinks]), cached[..., sinks:]], axis=-1)
    scores = jnp.concatenate([cached, scores_of(q, k_own)], axis=-1)
    visible = jnp.broadcast_to(visible[None], (group, *visible.shape)).reshape(group * s, -1)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(dt)
    out = jax.lax.dot_general(probs[..., :attn_len], v_cache[:, :attn_len].astype(dt), mix, preferred_element_type=f32)
    out += jax.lax.dot_general(probs[..., attn_len:], v_own.astype(dt), mix, preferred_element_type=f32)
    return out.reshape(n_kv, group, s, hd).transpose(2, 0, 1, 3).reshape(s, n_heads, hd).astype(q.dtype)


def _write_after_read(out, k, v, k_cache, v_cache, start):
    """The chunk's keys and values written into the caches from slot `start`.

    The write must come after the attention's read, or XLA keeps the old cache
    alive by copying it. Nothing orders the two, so make the written values
    depend on the output (0 * x is not folded away: it is NaN for x = inf).
    """
    after_read = jnp.zeros((), k.dtype) * out[0, 0, 0].astype(k.dtype)
    start = start[None]
    return write_cache(k_cache, k + after_read, start), write_cache(v_cache, v + after_read, start)


def ring_slot(pos: jax.Array, n_slots: int, sinks: int) -> jax.Array:
    """The slot of position `pos` in a ring cache: positions below `sinks` keep their own slots
    forever; the rest cycle through slots [sinks, n_slots)."""
    return jnp.where(pos < sinks, pos, sinks + jnp.mod(pos - sinks, n_slots - sinks))


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_pos: jax.Array,
    *,
    rope_inv_freq: np.ndarray,
    sinks: int,
    attn_len: int,
    window: int | None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`attention` over a ring cache with attention sinks (StreamingLLM): positions are unbounded.

    The T cache slots hold positions 0 .. sinks - 1 in slots 0 .. sinks - 1 forever
    and the last R = T - sinks other positions in a ring (`ring_slot`), so a
    query at p sees the sinks and positions p - R + 1 .. p. Keys are stored
    rotated at their own positions, so for a ring key the query's rope distance
    is the true one (at most R). A sink would drift ever further away; as in
    StreamingLLM, which numbers positions within the cache, it is scored against
    the query rotated at its position within the cache, min(p, T - 1), which
    puts the sinks just before the oldest ring key. (Rope depends on position
    differences only, so this equals re-rotating every key at its cache
    position, without rewriting the cache.) q and k come before rope.

    The chunk's S positions must map to consecutive slots (it never wraps the
    ring, so S <= R) and the chunk holds no padding rows: every row is written.
    The first `attn_len` slots are read; once the ring has wrapped that must be T.
    """
    n_slots = k_cache.shape[1]
    ring = n_slots - sinks
    q_sink = rope(q, jnp.minimum(q_pos, n_slots - 1), rope_inv_freq) if sinks else None
    q, k = rope(q, q_pos, rope_inv_freq), rope(k, q_pos, rope_inv_freq)
    big = jnp.iinfo(jnp.int32).max
    q0 = q_pos[0]
    # The position each slot holds before this chunk is written (`big` where none).
    slot = jnp.arange(attn_len)
    newest = ring_slot(q0 - 1, n_slots, sinks)
    held = jnp.where(slot < sinks, slot, (q0 - 1) - jnp.mod(newest - slot, ring))
    written = jnp.where(slot < sinks, slot < q0, held >= sinks)
    k_pos = jnp.concatenate([jnp.where(written, held, big), q_pos])
    visible = (k_pos[None, :] <= q_pos[:, None]) & ((k_pos[None, :] < sinks) | (k_pos[None, :] > q_pos[:, None] - ring))
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    out = _attend(q, k, v, k_cache, v_cache, visible, attn_len=attn_len, scale=scale, q_sink=q_sink, sinks=sinks)
    # Written after the read, at the chunk's first slot, as `attention` does.
    return (out, *_write_after_read(out, k, v, k_cache, v_cache, ring_slot(q0, n_slots, sinks)))
