"""Batch-1 y = W x for a quantized W (yalm_jax.quant.QuantizedMatrix), dequantized in the kernel.

The same design as `gemv.py` (whose configs, fused norm, gate, bias and
residual it shares): each program owns `block_n` rows and walks the quantized
row in chunks of `block_k` stored bytes, so the bytes read per token are the
quantized ones. Values turn into f32 in registers; scales (and int4 mins) are
applied once per group, after the group's products are summed:

  y_n = sum_g scale[n, g] * sum_{j in g} v[n, j] x[j]  (+ min[n, g] * sum_{j in g} x[j])

with v = q (int8, fp8) or q - 8 (int4 without a min); a zero point z (min = -scale z / 16) comes off the
group's sum as z / 16 * sum x, before its product by the scale. The kernel sees every
operand as groups, through free reshapes outside it: q as (N, K/G, bytes of a group), x as (K/G, G), and for int4,
whose byte j of a group holds column j in its low nibble and column j + G/2 in
its high one, x as (K/G, 2, G/2), so each chunk of bytes meets the two matching
runs of x straight from memory. A chunk is a (block_n, groups, bytes) tile whose
innermost axis is one group's bytes, so the sum per group needs no reshuffle.
Per-channel formats (one scale a row) take the chunk itself as the group, keep
a (block_n, 1, block_k) accumulator and scale once at the end.

For a matrix with int8_activations (quant.with_int8_activations: int8, or int4
in groups of 32, its bytes held as int32 words; or iq4, GGUF's IQ4_NL / IQ4_XS
codes, turned into their levels four at a time by prmt, which only this path
takes), the kernel multiplies integers instead: every program rounds each chunk of x (x * g with a fused norm) to int8
in blocks of 32 in registers, as quant.round_activations does, packs four to a
word, and multiplies words through PTX's dp4a (four products an instruction;
int4 unpacked into two words of nibbles); each block's integer sum is scaled
once by x's and the weights' scales. Rounding x in every program repeats a
little work per program, and measured cheaper than rounding it once in XLA
(the fusions before each kernel cost more than the kernels saved: KERNEL_NOTES.md,
run 8), and no dearer than rounding it once an SM in a persistent grid (run 9).
Where the kernel that computes x can round it as it writes it (`int8_out`: each
program rounds its own rows, whole blocks of 32), x comes as a quant.Int8Vector
and the products read its words as they are (run 10). A normed x (rms_norm(x)
with weight g) is rounded as the integers of x * g, the norm's 1 / rms(x) going
into the block scales, so a kernel can round it before rms(x) is known: with
`norm_out` it also writes each block's sum of x^2, from which the reader takes
1 / rms(x) (run 11). That factor multiplies the row sums at the end, so a kernel
that norms and rounds x itself sums x^2 in the same pass over x (run 16).

`gemv_quant_reference` is the function in plain jnp (dequantize, then
`gemv.gemv_reference`). Lowered through Pallas' Triton backend on the GPU;
`interpret=True` runs it anywhere (the PTX instructions as jnp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gemv import (
    _load_w,
    _pow2_divisor,
    append_epilogue,
    gemv_reference,
    kernel_name,
    write_epilogue,
)
from yalm_jax.quant import (
    ACT_BLOCK,
    IQ4_LEVELS,
    NIBBLE_FORMATS,
    ZERO_POINT_STEPS,
    Int8Vector,
    is_quantized,
    round_activations,
)

# (block_n, block_k in stored bytes, num_warps, num_stages), per (kind, n_out, k, gated), kind the first of
# `config_kinds` that has the shape. Mistral-7B's shapes, from scripts/gpu_check.py (sweep:int8, sweep:int4, sweep:fp8_e4m3,
# sweep:int8_g32, sweep:int8_a8, sweep:int4_a8, sweep:int8_g32_a8) on one H100 80GB HBM3, ranked by the GPU's
# own kernel times: int8 per channel and int4 2026-11-25 (run 5), the int8 activations' 2026-11-26 (run 8), 8-bit
# weights in groups 2026-11-26 (run 15: fp8 and Q8_0's form had run on the per-channel tiles; decodes fp8 3.418
# -> 3.271 ms, Q8_0's form 3.577 -> 3.408, with int8 activations 3.213 -> 3.165); other shapes take
# DEFAULT_CONFIG.
DEFAULT_CONFIG = (4, 2048, 8, 2)
CONFIGS: dict[tuple[str, int, int, bool], tuple[int, int, int, int]] = {
    # wqkv's and wo's re-swept once the float path loaded its weights before preparing x (run 16).
    ("8bit", 6144, 4096, False): (4, 4096, 8, 2),  # wqkv
    ("8bit", 4096, 4096, False): (2, 4096, 8, 2),  # wo
    ("8bit", 14336, 4096, True): (2, 4096, 4, 2),  # w13, gated
    ("8bit", 4096, 14336, False): (2, 2048, 4, 2),  # w2
    ("8bit", 32000, 4096, False): (4, 4096, 8, 2),  # output
    # fp8 and int8 in groups of 32 ranked alike (within 0.1 us but w2: fp8 25.01 us at (8, 2048, 8), 25.04 here).
    ("8bit_groups", 6144, 4096, False): (4, 4096, 8, 2),
    # wo: fp8's sweep after run 16's change ranked (4, 4096, 8) 0.3 us ahead, but decodes ran fp8 -0.3%, Q8_0's
    # form +0.5% on it.
    ("8bit_groups", 4096, 4096, False): (4, 2048, 4, 2),
    ("8bit_groups", 14336, 4096, True): (2, 4096, 4, 2),
    ("8bit_groups", 4096, 14336, False): (4, 2048, 4, 2),
    ("8bit_groups", 32000, 4096, False): (4, 4096, 8, 2),
    ("4bit", 6144, 4096, False): (8, 2048, 8, 2),
    ("4bit", 4096, 4096, False): (4, 2048, 4, 2),
    ("4bit", 14336, 4096, True): (8, 2048, 8, 2),
    ("4bit", 4096, 14336, False): (4, 1024, 4, 2),
    ("4bit", 32000, 4096, False): (4, 2048, 4, 2),
    ("8bit_a8", 6144, 4096, False): (16, 1024, 8, 2),
    ("8bit_a8", 4096, 4096, False): (8, 2048, 8, 2),
    ("8bit_a8", 14336, 4096, True): (4, 4096, 8, 2),
    ("8bit_a8", 4096, 14336, False): (8, 2048, 8, 2),
    ("8bit_a8", 32000, 4096, False): (4, 4096, 8, 2),
    ("8bit_groups_a8", 6144, 4096, False): (16, 2048, 16, 2),
    ("8bit_groups_a8", 4096, 4096, False): (4, 4096, 8, 2),
    ("8bit_groups_a8", 14336, 4096, True): (4, 4096, 8, 2),
    ("8bit_groups_a8", 4096, 14336, False): (8, 2048, 8, 2),
    ("8bit_groups_a8", 32000, 4096, False): (4, 4096, 8, 2),
    # Taller tiles than the float products': every program rounds all of x, so fewer programs round it less.
    # wqkv's re-swept once the norm's sum of squares joined the rounding's pass (run 16): 8.06 us against 9.48.
    ("4bit_a8", 6144, 4096, False): (8, 2048, 8, 2),
    ("4bit_a8", 4096, 4096, False): (16, 2048, 16, 2),
    # w13 reads x rounded by wo (ops.linear_for_next) and rounds h for w2 (ops.gated_ffn_up), which reads it as
    # it is: their best tiles in those forms (runs 10 and 11).
    ("4bit_a8", 14336, 4096, True): (32, 2048, 8, 2),
    ("4bit_a8", 4096, 14336, False): (4, 1024, 8, 2),
    ("4bit_a8", 32000, 4096, False): (8, 2048, 8, 2),
    # SmolLM2-135M (rows of 576 and 1536 columns: one masked chunk a row), ranked by kernel times (run 10).
    ("4bit", 960, 576, False): (4, 2048, 8, 2),
    ("4bit", 576, 576, False): (8, 2048, 8, 2),
    ("4bit", 1536, 576, True): (4, 2048, 4, 2),
    ("4bit", 576, 1536, False): (4, 2048, 4, 2),
    ("4bit", 49152, 576, False): (64, 128, 8, 2),
    ("4bit_a8", 960, 576, False): (8, 2048, 8, 2),
    ("4bit_a8", 576, 576, False): (8, 1024, 8, 2),
    ("4bit_a8", 1536, 576, True): (4, 2048, 8, 2),
    ("4bit_a8", 576, 1536, False): (8, 2048, 8, 2),
    ("4bit_a8", 49152, 576, False): (16, 512, 4, 2),
    # int4 with mins (GGUF's Q4_1 f16 ones; --quant=int4's zero points): wqkv 8.73 us against 9.28 on int4's
    # tile, w2 reading h rounded 15.34 against ~16 (sweep:int4_min_a8 and sweep:int4_min_a8:mistral_int8_h
    # 2026-11-27, H100, f16 mins; KERNEL_NOTES.md run 26). Elsewhere it takes int4's.
    ("4bit_min_a8", 6144, 4096, False): (16, 1024, 8, 2),
    ("4bit_min_a8", 4096, 14336, False): (8, 2048, 8, 2),
    # iq4's lookups (more instructions a word than int4's) want shorter chunks on w13 (which rounds h for w2),
    # w2 (reading it) and the output: sweep:iq4_a8 and sweep:iq4_a8:mistral_int8_h 2026-11-27, decodes 2.389 ->
    # 2.187 ms a token (H100; KERNEL_NOTES.md run 25). Elsewhere it takes int4's.
    ("iq4_a8", 14336, 4096, True): (32, 512, 4, 2),
    ("iq4_a8", 4096, 14336, False): (4, 2048, 4, 2),
    ("iq4_a8", 32000, 4096, False): (16, 512, 4, 2),
}


# A kernel rounding its output for the next matrix (int8_out), instead of that matrix's kernel rounding it in
# every program, measured faster on Mistral-7B's int4: w13 rounding h for w2 (2.061 against 2.106 ms a token: w2
# rounds a 14,336-long h in every program, 2.6 us a call, where w13's programs round their own rows for 1.1-1.4
# us; KERNEL_NOTES.md, run 10), and wo rounding the FFN's normed input for w13 (run 11). Slower where the next
# kernel rounds its input cheaply or the 32-row programs are too few to fill the card: Mistral's int8 (3.142
# against 3.092), SmolLM2's int4 (1,536 rows, 48 programs: 0.545 against 0.488 ms) (H100). Only a kernel
# on the integer path rounds its output: on the float path's tiles, the 32 rows a program it needs spill
# (a Q3_K_M file's w13, int8 in groups of 16, rounding h for w2's int4: decodes 7.88 ms a token against 3.38
# without int8 activations; BENCHMARKS.md run 22).
MIN_INT8_OUT_PROGRAMS = 128  # about an H100's 132 SMs; Mistral-7B's wo has 4,096 rows


def rounds_output_for(w, next_w, gated: bool = False) -> bool:
    """Whether w's kernel should round its output for next_w (int8_out), rather than next_w's kernel rounding
    it; `gated`: w holds gate and up rows, so its output has half as many."""
    both_a8 = all(is_quantized(m) and m.int8_activations for m in (w, next_w))
    if not (both_a8 and next_w.fmt in NIBBLE_FORMATS):
        return False
    return w.shape[0] // (2 if gated else 1) // ACT_BLOCK >= MIN_INT8_OUT_PROGRAMS


def config_kinds(w) -> tuple[str, ...]:
    """CONFIGS' first keys for a QuantizedMatrix w, the most particular first: its kernel path (int4's layout;
    8-bit weights (int8 or fp8) with a scale a row, or in groups, each group's sum scaled apart; and whether
    the products are integer: int8 activations), and before it the path with iq4's lookups or with mins."""
    if w.fmt in NIBBLE_FORMATS:
        kind = "4bit"
    else:
        kind = "8bit" if w.group == w.shape[1] else "8bit_groups"
    a8 = "_a8" if w.int8_activations else ""
    particular = "iq4" if w.fmt == "iq4" else f"{kind}_min" if w.min is not None else None
    return (kind + a8,) if particular is None else (particular + a8, kind + a8)


def config_for(w, n_out: int, k: int, gated: bool) -> tuple[int, int, int, int]:
    """The tile of w's kernel for `n_out` outputs of `k` columns: CONFIGS' for the first of w's kinds that
    has it, else DEFAULT_CONFIG."""
    keys = [(kind, n_out, k, gated) for kind in config_kinds(w)]
    return next((CONFIGS[key] for key in keys if key in CONFIGS), DEFAULT_CONFIG)


def _values(q, fmt: str, symmetric: bool) -> list:
    """The f32 values (before the scale) of a tile of stored bytes: [q] (int8, fp8), or int4's
    [low nibbles, high nibbles], less 8 when symmetric."""
    f32 = jnp.float32
    if fmt != "int4":
        return [q.astype(f32)]
    return [(n & 15).astype(f32) - (8.0 if symmetric else 0.0) for n in (q, q >> 4)]


def _table_words(values) -> list[int]:
    """Signed bytes packed four to a word, the lowest first, as int32 values."""
    b = [v & 0xFF for v in values]
    words = [b[i] | b[i + 1] << 8 | b[i + 2] << 16 | b[i + 3] << 24 for i in range(0, len(b), 4)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _prmt_ptx(a, b, c):
    """PTX's prmt: byte i of the result is byte (c's nibble i) of the 8 bytes b:a (a the lower four)."""
    return _ptx("prmt.b32", jnp.int32, a, b, jnp.asarray(c, jnp.int32))


def _prmt_jnp(a, b, c):
    """_prmt_ptx in integer jnp, for interpret mode (a selector's fourth bit, sign replication, unused here)."""
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 7
        out = out | ((jnp.where(sel < 4, a, b) >> (8 * (sel & 3))) & 0xFF) << (8 * i)
    return out


def _iq4_levels(q, interpret: bool) -> list:
    """iq4's words of codes (quant.iq4_words: the low half-word's four nibbles meet x's first half of a block,
    the high half-word's its second) to [the first four codes' levels, the last four's], int8 four to a word,
    as int4's nibbles (q & 0x0F0F0F0F, q >> 4 & ...) are laid out. prmt picks each code's level from
    IQ4_LEVELS' first and second eight by its low three bits, and a third picks between the two by its fourth
    (llama.cpp's get_int_from_table_16, less its two sorting prmts: iq4's words come sorted)."""
    prmt = _prmt_jnp if interpret else _prmt_ptx
    table = [jnp.full((), w, jnp.int32) for w in _table_words(IQ4_LEVELS)]
    low3 = q & 0x77777777
    pick = ((q >> 1) & 0x44444444) | 0x32103210  # a code's fourth bit selects the second eight's byte
    return [
        prmt(prmt(table[0], table[1], sel), prmt(table[2], table[3], sel), which)
        for sel, which in ((low3, pick), (low3 >> 16, pick >> 16))
    ]


def _ptx(instruction: str, dtype, *args):
    """One PTX instruction applied elementwise to `args` (32-bit registers, broadcast to one shape)."""
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    operands = ", ".join(f"${i}" for i in range(len(args) + 1))
    out = jax.ShapeDtypeStruct(shape, dtype)
    return plt.elementwise_inline_asm(
        f"{instruction} {operands};", args=[jnp.broadcast_to(a, shape) for a in args],
        constraints=",".join(["=r"] + ["r"] * len(args)), pack=1, result_shape_dtypes=[out],
    )[0]  # fmt: skip


def _fma_ptx(a, b, c):
    """a * b + c in one rounding, as PTX's fma: the Triton lowering emits separate multiplies and adds for
    `a * b + c` (Nsight Compute counted no fused instruction), and fusing them took the kernels 1-8% faster
    on an H200 (KERNEL_NOTES.md, run 7). Interpret mode, which runs no PTX, computes a * b + c."""
    return _ptx("fma.rn.f32", jnp.float32, a, b, c)


def _dp4a_ptx(a, b, c, signed_a: bool):
    """c + the dot product of a's and b's four bytes (b signed; a signed or not), a word at a time: PTX's dp4a,
    four products an instruction."""
    return _ptx(f"dp4a.{'s32' if signed_a else 'u32'}.s32", jnp.int32, a, b, c)


def _dp4a_jnp(a, b, c, signed_a: bool):
    """_dp4a_ptx in integer jnp, for interpret mode."""

    def byte(w, i, signed):
        return (w << (24 - 8 * i)) >> 24 if signed else (w >> (8 * i)) & 0xFF

    return c + sum(byte(a, i, signed_a) * byte(b, i, True) for i in range(4))


def _round_ptx(v):
    """v (|v| < 2**22) rounded to the nearest integer, ties to even, as int32: an f32 add of 1.5 * 2**23 leaves
    the rounded value in the low mantissa bits. An add issues at full rate, cvt.rni (a conversion) at a
    quarter: the kernels ran 0.5-2% faster (KERNEL_NOTES.md, run 8). `.rn` keeps it from fusing with the
    multiply before it, which would round once where round_activations rounds twice."""
    return _ptx("add.rn.f32", jnp.int32, v, jnp.full((), _MAGIC, jnp.float32)) - _MAGIC_BITS


_MAGIC, _MAGIC_BITS = 1.5 * 2**23, 0x4B400000  # 1.5 * 2**23 and its f32 bits


def _group_sums(t, reduce=jnp.sum):
    """Each group's reduction of a tile (ng, ...) of x: over every axis but the first."""
    while t.ndim > 1:
        t = reduce(t, axis=t.ndim - 1)
    return t


def _int8_blocks(xs: list, interpret: bool):
    """A chunk of x (f32 tiles (ng, words, 4), int4's two halves of each block) rounded as
    quant.round_activations rounds it: each tile's int32 words (four bytes a word, the lowest first), and each
    block's scale and sum of its integers, (1, ng)."""
    to_int = (lambda v: jnp.round(v).astype(jnp.int32)) if interpret else _round_ptx
    amax = functools.reduce(jnp.maximum, [_group_sums(jnp.abs(t), jnp.max) for t in xs])  # (ng,)
    inv = jnp.where(amax > 0, 127 / amax, 0.0)
    qs = [to_int(t * inv[:, None, None]) for t in xs]
    shifts = lax.broadcasted_iota(jnp.int32, qs[0].shape, 2) * 8
    words = [jnp.sum((q & 0xFF) << shifts, axis=2) for q in qs]  # the bytes don't overlap: the sum is an or
    qsum = sum(_group_sums(q) for q in qs).astype(jnp.float32)
    return words, (amax / 127)[None], qsum[None]


def _round_rows(y, g, interpret: bool) -> list:
    """A program's rows y (block_n,) f32 rounded as an Int8Vector's part: words, scales and sums; with the next
    norm's weight g (its rows, f32), y * g rounded and each block's sum of y^2 after them."""
    blocks = y.reshape(-1, ACT_BLOCK // 4, 4)
    words, scale, qsum = _int8_blocks([blocks if g is None else blocks * g.reshape(blocks.shape)], interpret)
    return [words[0], scale[0], qsum[0]] + ([] if g is None else [_group_sums(jnp.square(blocks))])


def _kernel(*refs, k, bn, ng, fmt, int8_activations, x_rounded, int8_out, symmetric, per_channel, gated, activation,
            has_norm, has_min, zero_point, has_bias, has_res, eps, norm_out, interpret):  # fmt: skip
    refs = list(refs)
    x_ref = refs.pop(0)  # x, or with x_rounded an Int8Vector's words, then its scales and sums (and sums of x^2)
    xr_refs = [refs.pop(0), refs.pop(0)] if x_rounded else None
    sumsq_ref = refs.pop(0) if x_rounded and has_norm else None
    g_ref = refs.pop(0) if has_norm and not x_rounded else None
    n_w = 2 if gated else 1
    q_refs = [refs.pop(0) for _ in range(n_w)]
    s_refs = [refs.pop(0) for _ in range(n_w)]
    m_refs = [refs.pop(0) for _ in range(n_w)] if has_min else None
    g_out_ref = refs.pop(0) if norm_out else None
    int8_refs = None
    if int8_out:  # the outputs after y
        n_int8 = 4 if norm_out else 3
        int8_refs, refs = refs[-n_int8:], refs[:-n_int8]
    f32 = jnp.float32
    two_a_byte = fmt in NIBBLE_FORMATS  # int4's layout: each byte's two nibbles meet x's two halves of a group
    n_groups = x_ref.shape[0]
    n_chunks = pl.cdiv(n_groups, ng)
    fma = (lambda a, b, c: a * b + c) if interpret else _fma_ptx
    dp4a = _dp4a_jnp if interpret else _dp4a_ptx

    def load(ref, g0, axis=0, weights=False):
        """ref's tile of groups g0 .. g0 + ng (along `axis`); past the last group (the row's chunks do not
        divide it) it reads as 0, which adds nothing to any sum below."""
        mask = None
        if n_groups % ng:
            mask = g0 + lax.broadcasted_iota(jnp.int32, ref.shape, axis) < n_groups
        if weights:
            return _load_w(ref, mask)
        return ref[...] if mask is None else plt.load(ref, mask=mask, other=0)

    def tiles(ref, g0):  # groups g0 .. g0 + ng of x (or of the norm's g) in the kernel's view; int4's two halves
        if two_a_byte:
            return [load(ref.at[pl.ds(g0, ng), jnp.int32(h)], g0) for h in (0, 1)]
        return [load(ref.at[pl.ds(g0, ng)], g0)]

    # The float path rounds normed x to its dtype, as ops.rms_norm does, so it needs 1 / rms(x) first. With int8
    # activations that factor is common to every block scale and multiplies the row sums at the end (below).
    norm_scale = None
    if has_norm and not int8_activations:

        def sum_sq(i, acc):
            return acc + sum(_group_sums(jnp.square(t.astype(f32))) for t in tiles(x_ref, pl.multiple_of(i * ng, ng)))

        norm_scale = lax.rsqrt(jnp.sum(lax.fori_loop(0, n_chunks, sum_sq, jnp.zeros((ng,), f32))) / k + eps)

    def body(i, carry):
        accs, x_sq = carry
        g0 = pl.multiple_of(i * ng, ng)

        def weights(r):  # (bn, ng, a group's bytes, or words)
            return load(r.at[:, pl.ds(g0, ng), :], g0, 1, weights=True)

        # Float products: the weights' loads first, so that x's preparation (norm, rounding to x's dtype) runs
        # while they are in flight (fp8 and int8 decodes -1.5%). Not where a program holds two matrices' rows
        # (gated: w13 0.2-0.6 us slower) or multiplies int8 activations (level, or slower: int4's w13 reading x
        # rounded +14%): KERNEL_NOTES.md, run 16. There each loads where it is used.
        early = None if int8_activations or gated else [weights(r) for r in q_refs]
        if x_rounded:
            x_words, (x_scale, x_qsum) = tiles(x_ref, g0), [load(r.at[pl.ds(g0, ng)], g0)[None] for r in xr_refs]
        elif int8_activations:
            xs = [t.astype(f32) for t in tiles(x_ref, g0)]
            if has_norm:  # x * g rounded (quant.round_activations)
                x_sq = x_sq + sum(_group_sums(jnp.square(t)) for t in xs)
                xs = [t * g.astype(f32) for t, g in zip(xs, tiles(g_ref, g0))]
            x_words, x_scale, x_qsum = _int8_blocks(xs, interpret)
        else:
            xs = tiles(x_ref, g0)
            if has_norm:
                # Same roundings as ops.rms_norm: normalise in f32, round, scale by g in x's dtype.
                xs = [(t.astype(f32) * norm_scale).astype(t.dtype) * g for t, g in zip(xs, tiles(g_ref, g0))]
            xs = [t.astype(f32) for t in xs]
        new = []
        for w, acc in enumerate(accs):
            q = weights(q_refs[w]) if early is None else early[w]
            # dot: each group's sum of v x (v the weights' values before their scale); xsum: each group's x sum.
            if int8_activations:
                # int4's low nibbles are a block's first half, its high nibbles the second (quant.pack_int4).
                if fmt == "iq4":
                    nibbles = _iq4_levels(q, interpret)
                else:
                    nibbles = [q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F]
                pairs = zip(nibbles, x_words) if two_a_byte else [(q, x_words[0])]
                dot = jnp.zeros(q.shape, jnp.int32)
                for a, b in pairs:
                    dot = dp4a(a, b[None], dot, signed_a=fmt != "int4")
                dot = jnp.sum(dot, axis=2).astype(f32) - (8 * x_qsum if symmetric else 0)  # exact integers
                dot, xsum = dot * x_scale, x_scale * x_qsum
            else:
                vals, xb = _values(q, fmt, symmetric), [t[None] for t in xs]
                if per_channel:  # one scale a row: accumulate products, reduce once at the end
                    new.append(fma(vals[0], xb[0], acc))
                    continue
                dot = jnp.sum(vals[0] * xb[0] if len(vals) == 1 else fma(vals[1], xb[1], vals[0] * xb[0]), axis=2)
                xsum = sum(_group_sums(t) for t in xs)[None] if has_min else None
            mins = load(m_refs[w].at[:, pl.ds(g0, ng)], g0, 1).astype(f32) if has_min else None
            if zero_point:  # min = -scale * z / ZERO_POINT_STEPS: subtracted before the one product by the scale
                dot = dot - mins * (1 / ZERO_POINT_STEPS) * xsum
            if not per_channel:
                dot = dot * load(s_refs[w].at[:, pl.ds(g0, ng)], g0, 1).astype(f32)
            if has_min and not zero_point:
                dot = dot + mins * xsum
            new.append(acc + dot)
        return tuple(new), x_sq

    shape = (bn, ng, x_ref.shape[-1]) if per_channel and not int8_activations else (bn, ng)
    zeros = tuple(jnp.zeros(shape, f32) for _ in q_refs)
    accs, x_sq = lax.fori_loop(0, n_chunks, body, (zeros, jnp.zeros((ng,), f32)))
    ys = [jnp.sum(a.reshape(bn, -1), axis=1) for a in accs]
    if int8_activations and has_norm:
        # The sums of x^2: a normed Int8Vector's blocks bring them, a kernel rounding x * g summed them in its pass.
        sq = sumsq_ref[...] if sumsq_ref is not None else x_sq
        ys = [y * lax.rsqrt(jnp.sum(sq) / k + eps) for y in ys]
    if per_channel:
        ys = [y * s[...].astype(f32)[:, 0] for y, s in zip(ys, s_refs)]
    y = write_epilogue(refs, ys, gated, activation, has_bias, has_res)
    if int8_out:  # y rounded as it was written, its blocks whole in this program's rows
        g_out = None if g_out_ref is None else g_out_ref[...].astype(f32)
        for ref, v in zip(int8_refs, _round_rows(y.astype(f32), g_out, interpret)):
            ref[...] = v.reshape(ref.shape)


def gemv_quant(
    w,
    x: jax.Array | Int8Vector,
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    gated: bool = False,
    activation: str = "silu",
    config: tuple[int, int, int, int] | None = None,
    out: jax.Array | None = None,
    int8_out: bool = False,
    norm_out: tuple[jax.Array, float] | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, Int8Vector]:
    """`gemv.gemv` for a QuantizedMatrix w (N, K): y = W x (+ bias) (+ residual) in `out_dtype` (default x's),
    f32 accumulation.

    `config` = (block_n, block_k, num_warps, num_stages), block_k counting stored
    bytes of a row; block_n shrinks to a power of two that divides the row count,
    and a chunk holds whole groups (the last one masked where the chunks do not
    divide the row). `out` is an optional buffer aliased to the result.

    x may be an Int8Vector (for w with int8_activations; a normed one brings its norm, so `norm` stays None):
    the kernel reads its integers as they are, and y comes out in w's compute dtype. With `int8_out`, the
    result is (y, y as an Int8Vector): each program rounds its own rows (block_n grows to a whole number of
    ACT_BLOCK blocks); with `norm_out` = (weight, eps) too, the Int8Vector stands for rms_norm(y) with them,
    for a next matrix whose input is normed (quant.round_activations).
    """
    n, k = w.shape
    x_rounded = isinstance(x, Int8Vector)
    if x.shape != (k,):
        raise ValueError(f"x has shape {x.shape}, expected ({k},)")
    if gated and n % 2:
        raise ValueError(f"gated gemv needs an even row count, got {n}")
    if x_rounded and (not w.int8_activations or norm is not None):
        raise ValueError("an Int8Vector x is for a matrix with int8_activations, without a norm of its own")
    if norm_out is not None and not int8_out:
        raise ValueError("norm_out is the norm of int8_out's vector")
    if w.fmt == "iq4" and not w.int8_activations:
        raise ValueError("iq4 multiplies int8 activations (quant.with_int8_activations); for float products "
                         "it is int8 holding its levels (quant.iq4_as_int8)")  # fmt: skip
    two_a_byte = w.fmt in NIBBLE_FORMATS
    per_channel = w.group == k and not two_a_byte
    act8 = w.int8_activations
    n_out = n // 2 if gated else n
    bn, bk, num_warps, num_stages = config or config_for(w, n_out, k, gated)
    bn = _pow2_divisor(n_out, max(bn, ACT_BLOCK) if int8_out else bn)
    if int8_out and bn % ACT_BLOCK:
        raise ValueError(f"int8_out needs a row count divisible by {ACT_BLOCK}, got {n_out}")
    # The kernel's view: groups of G columns (per channel: the largest power of two <= bk that divides K; with
    # an int8 activation, its blocks) and their stored bytes (with an int8 activation, as int32 words). A chunk
    # is ng groups, bk stored bytes or the whole row if less; where ng does not divide the groups, the last
    # chunk is masked (SmolLM2's 576 columns: one chunk of 32 groups of 32, 18 of them real).
    group = ACT_BLOCK if act8 else _pow2_divisor(k, bk) if per_channel else w.group
    stored = group // 2 if two_a_byte else group
    ng = min(max(1, bk // stored), pl.next_power_of_2(k // group))

    if act8:  # with_int8_activations' int32 words; x as (blocks, [halves,] words, 4), a word's values side by side
        q = w.q.reshape(n, k // group, stored // 4)
        words = (2, ACT_BLOCK // 8) if two_a_byte else (ACT_BLOCK // 4,)
        view = lambda v: v.reshape(-1, *words, 4)  # noqa: E731
    else:
        q = w.q_bytes().reshape(n, k // group, stored)
        view = (lambda v: v.reshape(-1, 2, group // 2)) if two_a_byte else (lambda v: v.reshape(-1, group))
    # A normed Int8Vector: its integers hold the norm's weight already; the kernel takes 1 / rms(x) from its sums.
    normed_vector = x_rounded and x.sumsq is not None
    eps = x.eps if normed_vector else float(norm[1]) if norm is not None else 0.0
    if x_rounded:  # its words as (blocks, [halves,] words), as _int8_blocks would make them
        xs = [x.words.reshape(-1, *words), x.scale, x.qsum]
        xs += [x.sumsq] if normed_vector else []
    else:
        xs = [view(x)] + ([view(norm[0].astype(x.dtype))] if norm is not None else [])
    vec_n = pl.BlockSpec((bn,), lambda i: (i,))
    operands, specs = xs, [pl.BlockSpec(v.shape, lambda i, nd=v.ndim: (0,) * nd) for v in xs]
    h = n_out // bn
    for arr in (q, w.scale) + ((w.min,) if w.min is not None else ()):
        block = (bn, *arr.shape[1:])
        zeros = (0,) * (arr.ndim - 1)
        # The row block of `arr`, and for the gate's partner the up rows h blocks below.
        specs.append(pl.BlockSpec(block, lambda i, z=zeros: (i, *z)))
        operands.append(arr)
        if gated:
            specs.append(pl.BlockSpec(block, lambda i, z=zeros: (i + h, *z)))
            operands.append(arr)
    if norm_out is not None:
        operands.append(norm_out[0])
        specs.append(vec_n)
    aliases = append_epilogue(operands, specs, vec_n, bias, residual, out)
    dtype = out_dtype or (jnp.dtype(w.dtype) if x_rounded else x.dtype)
    out_shape, out_specs = jax.ShapeDtypeStruct((n_out,), dtype), vec_n
    if int8_out:  # words, then each block's scale and integer sum (and with norm_out, its sum of y^2)
        sizes = [(n_out // 4, bn // 4, jnp.int32)] + [(n_out // ACT_BLOCK, bn // ACT_BLOCK, jnp.float32)] * (
            3 if norm_out is not None else 2
        )
        out_shape = (out_shape, *(jax.ShapeDtypeStruct((size,), dt) for size, _, dt in sizes))
        out_specs = (vec_n, *(pl.BlockSpec((block,), lambda i: (i,)) for _, block, _ in sizes))

    common = dict(bn=bn, ng=ng, symmetric=w.fmt == "int4" and w.min is None, per_channel=per_channel, gated=gated,
                  activation=activation, has_min=w.min is not None, zero_point=w.zero_points,
                  has_bias=bias is not None,
                  has_res=residual is not None, interpret=interpret)  # fmt: skip
    kernel = functools.partial(_kernel, k=k, fmt=w.fmt, int8_activations=act8, x_rounded=x_rounded,
                               int8_out=int8_out, has_norm=norm is not None or normed_vector,
                               norm_out=norm_out is not None, eps=eps, **common)  # fmt: skip
    result = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(h,),
        in_specs=specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=kernel_name(f"gemv_{w.fmt}{'_a8' if act8 else ''}", n_out, k, gated, (bn, bk, num_warps)),
    )(*operands)
    if not int8_out:
        return result
    return result[0], Int8Vector(*result[1:], eps=None if norm_out is None else float(norm_out[1]))


def gemv_quant_reference(w, x, **kw) -> jax.Array:
    """The function `gemv_quant` computes (without `int8_out`), in plain jnp: dequantize to f32, then
    `gemv_reference`; for a matrix with int8_activations, x normed and rounded (quant.round_activations)
    first, or an Int8Vector's values."""
    if isinstance(x, Int8Vector):  # its f32 values; y in w's compute dtype unless out_dtype says, as the kernel
        kw["out_dtype"] = kw.get("out_dtype") or jnp.dtype(w.dtype)
        return gemv_reference(w.dequantize(jnp.float32), x.values(), **kw)
    if w.int8_activations:  # x normed and rounded to int8 blocks (quant.round_activations), in x's dtype
        x = round_activations(x[None], kw.pop("norm", None))[0]
    return gemv_reference(w.dequantize(jnp.float32), x, **kw)
