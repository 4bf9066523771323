"""Quantized weight matrices: formats, quantize / dequantize, and the pytree leaf the model holds.

A `QuantizedMatrix` stands in the weights pytree where a dense (out, in)
matrix would be. `ops.linear` and `ops.gated_ffn_up` dispatch on it: the xla
path dequantizes inside the jitted graph (decode as one multiply-then-sum
fusion that reads the quantized bytes; on the CPU, int8 with a scale a row as
an integer product, `_int8_product`), the pallas decode path calls
`pallas_kernels/gemv_quant.py`, which dequantizes in the kernel. Indexing rows
(`w[tokens]`, the embedding lookup) dequantizes just those rows.

Formats, for a matrix W (N, K) split along K into groups of `group` columns
(group == K: one scale per output channel):

* ``int8``: q int8 (N, K); W = scale * q, or scale * q + min with a min (GGUF's Q5_K only).
* ``int4``: q uint8 (N, K/2), two values per byte. Within each group, byte j
  holds column j in its low nibble and column j + group/2 in its high nibble
  (GGUF's Q4 block layout). W = scale * (q - 8), or scale * q + min with a min.
  `quantize`'s mins are zero points: min uint8 z, the min -scale * z / 16
  (`mins_of`; half an f16 min's bytes, within 1/32 of a step of the best min).
* ``iq4``: q int32 (N, K/8), each nibble a code for one of 16 levels (IQ4_LEVELS,
  GGUF's IQ4_NL and IQ4_XS); W = scale * level. Only GGUF's blocks make it. Within
  each group, word w holds int4's bytes 4w .. 4w + 3 with their nibbles sorted:
  columns 4w .. 4w + 3 in its low half-word, group/2 + 4w .. group/2 + 4w + 3 in
  its high one, a nibble each, the lowest first (`iq4_words`). The GPU kernel
  for int8 activations looks four levels up at a time (as llama.cpp does), and
  in this order each lookup gives the four levels that meet one word of x with
  no sorting after it; float products take iq4 as int8 holding its levels
  (`iq4_as_int8`).
* ``fp8_e4m3`` / ``fp8_e5m2``: q float8 (N, K); W = scale * q. Each scale is the one, of a few
  candidates above absmax / the format's max, that rounds its group with the least squared error
  (`_fp8_quantize`); --quant=fp8 takes groups of 32.

scale and min have shape (N, K / group): float16 for groups (as GGUF stores
them), float32 per channel. The GGUF block types map onto these without a
round trip through float (`from_gguf_blocks`): Q8_0 is int8 group 32, Q4_0 int4
group 32, Q4_1 int4 group 32 with a min, Q5_0 int8 group 32 (its 5-bit values,
-16..15), Q5_1 the same with a min (values 0..31), IQ4_NL iq4 group 32, bit for
bit. The K-quants keep their integers too: Q4_K is int4 group 32 with a min, Q5_K
int8 group 32 with a min (values 0..31), Q6_K int8 group 16, Q3_K int8 group 16
(-4..3), Q2_K int8 group 16 with a min (0..3), IQ4_XS iq4 group 32; their scales
(a block's f16 scale times each sub-block's 4- to 8-bit one) are rounded to f16,
a relative 2^-12 at most, some hundred times below the 2- to 6-bit steps
themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from yalm_jax.errors import UserError

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
# Values a quantize-at-load flag (--quant) takes; "native" keeps GGUF's blocks (GGUF_TYPES) as they are.
CHOICES = ("none", "native", "int8", "int4", "fp8", "fp8_e5m2")
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 32  # SmolLM2 perplexity: +0.07% at 32, +33% at 64 (BENCHMARKS.md)
# quantize's int4 mins are zero points in steps of scale / ZERO_POINT_STEPS: SmolLM2's perplexity +0.51% against
# bf16 where f16 mins read +0.10% (BENCHMARKS.md run 26), for 4.75 bits a weight against 5.
ZERO_POINT_STEPS = 16
# SmolLM2 perplexity against bf16 weights (BENCHMARKS.md): +0.44% in groups of 32, +1.20% with one scale a row.
FP8_GROUP = 32
FP8_SCALE_STEPS = 16  # candidate fp8 scales tried per group, spaced evenly over one octave
_FP8 = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
NIBBLE_FORMATS = ("int4", "iq4")  # two values a byte, in int4's layout
# IQ4's 16 levels (ggml's kvalues_iq4nl): an iq4 code indexes them, so its values are these integers.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# GGUF block types that map onto a format: (format, group, has min, values a block, bytes a block).
GGUF_TYPES = {
    "Q8_0": ("int8", 32, False, 32, 34),
    "Q5_0": ("int8", 32, False, 32, 22),
    "Q5_1": ("int8", 32, True, 32, 24),
    "IQ4_NL": ("iq4", 32, False, 32, 18),
    "Q4_0": ("int4", 32, False, 32, 18),
    "Q4_1": ("int4", 32, True, 32, 20),
    "Q2_K": ("int8", 16, True, 256, 84),
    "Q3_K": ("int8", 16, False, 256, 110),
    "Q4_K": ("int4", 32, True, 256, 144),
    "Q5_K": ("int8", 32, True, 256, 176),
    "Q6_K": ("int8", 16, False, 256, 210),
    "IQ4_XS": ("iq4", 32, False, 256, 136),
}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q", "scale", "min"],
    meta_fields=["fmt", "group", "dtype", "int8_activations"],
)
@dataclasses.dataclass
class QuantizedMatrix:
    """A quantized (N, K) matrix; `dtype` is the compute dtype it dequantizes to. With `int8_activations`
    (int8, int4 and iq4: `with_int8_activations`), the vectors it multiplies are rounded to int8 in blocks
    of ACT_BLOCK first, so the GPU kernel multiplies integers, four products an instruction; q then holds
    its bytes as int32 words, four a word, the form that kernel reads (as iq4's always does; `q_bytes` gives
    the bytes back)."""

    q: jax.Array  # int8 / uint8 / float8 (N, row bytes), or int32 words (N, row bytes / 4): iq4, int8_activations
    scale: jax.Array  # (N, K // group)
    # (N, K // group), int4, or int8 in groups (GGUF's Q5_1, Q5_K, Q2_K): f16 mins, or uint8 zero points (`mins_of`);
    # None: symmetric
    min: jax.Array | None
    fmt: str
    group: int
    dtype: str = "float32"
    int8_activations: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        n, kq = self.q.shape[0], self.q.shape[1] * jnp.dtype(self.q.dtype).itemsize
        return (n, kq * 2 if self.fmt in NIBBLE_FORMATS else kq)

    def q_bytes(self) -> jax.Array:
        """q as stored bytes (N, row bytes), also where it holds int32 words."""
        if self.q.dtype != np.int32:
            return self.q
        byte = np.uint8 if self.fmt in NIBBLE_FORMATS else np.int8
        if isinstance(self.q, np.ndarray):  # a host matrix: a view, as as_words made its words
            return np.ascontiguousarray(self.q).view(byte)
        return lax.bitcast_convert_type(self.q, byte).reshape(self.q.shape[0], -1)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (self.q, self.scale, self.min) if x is not None)

    @property
    def zero_points(self) -> bool:
        """Whether its mins are uint8 zero points (`mins_of`) rather than f16 mins."""
        return self.min is not None and self.min.dtype == np.uint8

    @property
    def stored_form(self) -> StoredForm:
        return StoredForm(self.fmt, self.group, self.min is not None, self.nbytes)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)

    def __getitem__(self, rows) -> jax.Array:
        """The dequantized rows `rows` (e.g. the embedding lookup), in the compute dtype."""
        part = dataclasses.replace(
            self, q=self.q[rows], scale=self.scale[rows], min=None if self.min is None else self.min[rows]
        )
        return dequantize(part)


ACT_BLOCK = 32  # values per scale of an int8 activation (llama.cpp's Q8_1 block)


def _int8_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (..., K) in blocks of ACT_BLOCK: each block's integers (f32, |q| <= 127) and its absmax (..., K/B, 1)."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, ACT_BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    # One reciprocal a block, then a multiply a value, as the kernels do.
    return jnp.round(xb * jnp.where(amax > 0, 127 / amax, 0.0)), amax


def _rms_scale(x: jax.Array, eps: float) -> jax.Array:
    """1 / rms(x) over the last axis, in f32 (the norm's factor), with a kept axis for the blocks' broadcast."""
    xf = x.astype(jnp.float32)
    return lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)[..., None]


def round_activations(x: jax.Array, norm: tuple[jax.Array, float] | None = None) -> jax.Array:
    """x (..., K) as int8 activations stand for it, in x's dtype: each block of ACT_BLOCK values scaled by its
    absmax / 127 and rounded to an integer, then scaled back. The GPU kernels round x the same way, in
    registers (gemv_quant._int8_blocks); paths that compute in floating point (the CPU, prefill) multiply
    these values.

    With `norm` = (weight, eps), what is rounded is rms_norm(x) = x * weight / rms(x): the integers are those
    of x * weight (in f32), and the norm's 1 / rms(x), a factor common to every block, goes into the block
    scales. Rounding does not depend on that factor, so the kernel that computes x can round x * weight as it
    writes it, before anyone knows rms(x) (gemv_quant's `int8_out` with `norm_out`).
    """
    if norm is None:
        q, amax = _int8_codes(x)
        return (q * (amax / 127)).reshape(x.shape).astype(x.dtype)
    weight, eps = norm
    q, amax = _int8_codes(x.astype(jnp.float32) * weight.astype(jnp.float32))
    return (q * (amax / 127 * _rms_scale(x, eps))).reshape(x.shape).astype(x.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["words", "scale", "qsum", "sumsq"],
                   meta_fields=["eps"])  # fmt: skip
@dataclasses.dataclass
class Int8Vector:
    """A vector (K,) held as int8 activations: what the GEMV that computes it writes when the next matrix
    multiplies int8 activations (gemv_quant's `int8_out`), so that matrix's kernel reads them instead of rounding
    the vector again in every program (KERNEL_NOTES.md, run 10).

    With `sumsq`, it stands for rms_norm(x) rounded (round_activations with a norm): the integers and scales
    are those of x * weight, and the reader multiplies the scales by 1 / rms(x), from the blocks' sums of x^2
    and `eps` (KERNEL_NOTES.md, run 11)."""

    words: jax.Array  # (K / 4,) int32: the integers, four bytes a word, the lowest first
    scale: jax.Array  # (K / ACT_BLOCK,) f32: each block's absmax / 127
    qsum: jax.Array  # (K / ACT_BLOCK,) f32: each block's sum of its integers (for int4's -8 and mins)
    sumsq: jax.Array | None = None  # (K / ACT_BLOCK,) f32: each block's sum of x^2, for a normed vector
    eps: float | None = None  # the norm's epsilon, for a normed vector

    @property
    def shape(self) -> tuple[int]:
        return (self.words.shape[0] * 4,)

    def rms_scale(self) -> jax.Array | float:
        """The factor the scales take at use: the norm's 1 / rms(x), or 1 for a vector without a norm."""
        if self.sumsq is None:
            return 1.0
        return lax.rsqrt(jnp.sum(self.sumsq) / self.shape[0] + self.eps)

    def values(self) -> jax.Array:
        """The f32 values it stands for: round_activations(x[, norm]) before that rounds them to x's dtype."""
        q = lax.bitcast_convert_type(self.words, jnp.int8).reshape(-1, ACT_BLOCK).astype(jnp.float32)
        return (q * (self.scale * self.rms_scale())[:, None]).reshape(-1)


def to_int8_vector(x: jax.Array, norm: tuple[jax.Array, float] | None = None) -> Int8Vector:
    """x (K,) rounded as round_activations rounds it, held as an Int8Vector (the kernels' reference)."""
    xf = x.astype(jnp.float32)
    q, amax = _int8_codes(xf if norm is None else xf * norm[0].astype(jnp.float32))
    words = lax.bitcast_convert_type(q.astype(jnp.int8).reshape(-1, 4), jnp.int32)
    vector = Int8Vector(words=words, scale=amax[..., 0] / 127, qsum=jnp.sum(q, axis=-1))
    if norm is None:
        return vector
    sumsq = jnp.sum(jnp.square(xf).reshape(-1, ACT_BLOCK), axis=-1)
    return dataclasses.replace(vector, sumsq=sumsq, eps=float(norm[1]))


def takes_int8_activations(w) -> bool:
    """Whether `w` can multiply int8 activations: int8 per channel or in groups of ACT_BLOCK, int4 and iq4 in
    groups of ACT_BLOCK (GGUF's Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q5_K, IQ4_NL and IQ4_XS included)."""
    if not is_quantized(w) or w.fmt not in ("int8", *NIBBLE_FORMATS):
        return False
    return w.group == ACT_BLOCK or (w.fmt == "int8" and w.group == w.shape[1])


def with_int8_activations(weights):
    """`weights` with every matrix that can (`takes_int8_activations`) set to multiply int8 activations, its
    bytes regrouped into int32 words once, here, rather than by every decode step."""

    def mark(w):
        if not takes_int8_activations(w) or w.int8_activations:
            return w
        return dataclasses.replace(w, q=as_words(w.q), int8_activations=True)

    return jax.tree.map(mark, weights, is_leaf=is_quantized)


def as_words(q):
    """Stored bytes (N, row bytes) as int32 words (N, row bytes / 4), the lowest byte first; words as they are.
    A host (numpy) array gives a view of its bytes."""
    if q.dtype == np.int32:
        return q
    if isinstance(q, np.ndarray):
        return np.ascontiguousarray(q).reshape(q.shape[0], -1, 4).view(np.int32)[..., 0]
    return lax.bitcast_convert_type(q.reshape(q.shape[0], -1, 4), jnp.int32)


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedMatrix)


def parse_choice(choice: str) -> tuple[str | None, int | None]:
    """--quant's value to (format or None or "native", group; None: one scale a row): "int4:128", "fp8"..."""
    name, _, group = (choice or "none").partition(":")
    if name not in CHOICES:
        raise ValueError(f"unknown quantization {choice!r}; choose one of {', '.join(CHOICES)} (int4 takes :32/:64/:128)")
    if group and (name != "int4" or int(group) not in INT4_GROUPS):
        raise ValueError(f"a group size is for int4 only, one of {INT4_GROUPS}: got {choice!r}")
    fmt = {"none": None, "fp8": "fp8_e4m3"}.get(name, name)
    default = {"int4": DEFAULT_INT4_GROUP, "fp8_e4m3": FP8_GROUP, "fp8_e5m2": FP8_GROUP}.get(fmt)
    return fmt, int(group) if group else default


def pick_group(k: int, group: int) -> int:
    """`group` when it divides k, else the largest of INT4_GROUPS below it that does (SmolLM2's 576 takes 64)."""
    for g in sorted([x for x in INT4_GROUPS if x <= group] + [group], reverse=True):
        if k % g == 0:
            return g
    raise ValueError(f"no group size of at most {group} in {INT4_GROUPS} divides the row length {k}")


# -- quantize (host, numpy) ---------------------------------------------------------------


def quantize(w: np.ndarray, fmt: str, group: int | None = None, *, with_min: bool = False, dtype: str = "float32"):
    """A host-side (numpy) QuantizedMatrix of w (N, K). Each `group` columns of a row share a scale (None: the
    whole row; int4 defaults to DEFAULT_INT4_GROUP). Rounds to nearest."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if fmt == "int8":
        g = group or k
        wg = w.reshape(n, k // g, g)
        scale = _scale(np.abs(wg).max(-1) / 127.0, g, k)
        q = np.clip(np.rint(wg / _safe(scale)[..., None]), -127, 127).astype(np.int8).reshape(n, k)
        return QuantizedMatrix(q, scale, None, "int8", g, dtype)
    if fmt == "int4":
        g = pick_group(k, group or DEFAULT_INT4_GROUP)
        wg = w.reshape(n, k // g, g)
        if with_min:  # a zero point: the range holds 0, so z = -16 lo / scale is 0..240
            lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
            scale = _scale((hi - lo) / 15.0, g, k)
            s = _safe(scale).astype(np.float32)
            mn = np.rint(-ZERO_POINT_STEPS * lo / s).astype(np.uint8)
            q = np.clip(np.rint((wg - mins_of(scale, mn)[..., None]) / s[..., None]), 0, 15)
        else:
            scale = _scale(np.abs(wg).max(-1) / 7.0, g, k)
            mn = None
            q = np.clip(np.rint(wg / _safe(scale)[..., None]), -8, 7) + 8
        return QuantizedMatrix(pack_int4(q.astype(np.uint8).reshape(n, k), g), scale, mn, "int4", g, dtype)
    if fmt in _FP8:
        g = pick_group(k, group) if group else k
        q, scale = _fp8_quantize(w, fmt, g)
        return QuantizedMatrix(np.asarray(q), np.asarray(scale), None, fmt, g, dtype)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


# XLA:GPU may skip a rounding to a narrower type inside a fusion ("excess precision"): the candidates' errors
# would then be measured on unrounded values and the first candidate kept (93% of groups, seen on an H200).
@functools.partial(
    jax.jit, static_argnames=("fmt", "group"), compiler_options={"xla_allow_excess_precision": False}
)
def _fp8_quantize(w: jax.Array, fmt: str, group: int) -> tuple[jax.Array, jax.Array]:
    """(q, scale) of w (N, K) in fp8, per group of `group` columns: of FP8_SCALE_STEPS scales from
    absmax / max up to twice that, the one whose rounding has the least squared error.

    fp8's grid is logarithmic, so no scale changes the relative error of a typical value; the
    choice places the group's largest values, which carry most of the error, near grid points.
    One octave holds every distinct placement. Against absmax / max it takes SmolLM2's KL
    divergence from bf16 down 40% in groups of 32 (BENCHMARKS.md). Jitted: it rounds each weight
    FP8_SCALE_STEPS times.
    """
    f8 = _FP8[fmt]
    top = float(ml_dtypes.finfo(f8).max)
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    base = jnp.max(jnp.abs(wg), axis=-1) / top
    stored = jnp.float32 if group == k else jnp.float16  # as _scale stores them

    def rounded(s):
        s = s.astype(stored).astype(jnp.float32)  # q is computed with the scale as stored
        # Clipped: a scale rounded to f16 may sit just below absmax / max, and e4m3 turns overflow into NaN.
        q = jnp.clip(wg / jnp.where(s == 0, 1, s)[..., None], -top, top).astype(f8)
        return q, s

    def try_step(j, best):
        q, s = rounded(base * 2.0 ** (j / FP8_SCALE_STEPS))
        err = jnp.sum(jnp.square(q.astype(jnp.float32) * s[..., None] - wg), axis=-1)
        better = err < best[1]
        return jnp.where(better, s, best[0]), jnp.where(better, err, best[1])

    scale, _ = lax.fori_loop(0, FP8_SCALE_STEPS, try_step, (base, jnp.full(base.shape, jnp.inf)))
    q, scale = rounded(scale)
    return q.reshape(n, k), scale.astype(stored)


def _scale(s: np.ndarray, group: int, k: int) -> np.ndarray:
    # Per channel in f32; per group in f16 as GGUF stores them (the rounded scale is the one q is computed with).
    return s.astype(np.float32 if group == k else np.float16)


def _safe(scale: np.ndarray) -> np.ndarray:
    s = scale.astype(np.float32)
    return np.where(s == 0, np.float32(1), s)  # an all-zero row or group: q = 0


def pack_int4(q: np.ndarray, group: int) -> np.ndarray:
    """(N, K) values in 0..15 to (N, K/2) bytes: per group, column j low nibble, column j + group/2 high."""
    n, k = q.shape
    qg = q.reshape(n, k // group, 2, group // 2)
    return (qg[:, :, 0] | (qg[:, :, 1] << 4)).astype(np.uint8).reshape(n, k // 2)


def unpack_int4(packed, group: int):
    """The inverse of `pack_int4`, in numpy or jnp: (N, K/2) bytes to (N, K) values 0..15 (uint8)."""
    xp = jnp if isinstance(packed, jax.Array) else np
    n, kh = packed.shape
    b = packed.reshape(n, kh // (group // 2), 1, group // 2)
    # A broadcast shift, not a concatenation of the two nibbles: XLA GPU's concatenate fusion wrote the dense
    # matrix at half the bandwidth (BENCHMARKS.md run 28).
    return ((b >> xp.asarray([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(n, 2 * kh)


# -- GGUF blocks ----------------------------------------------------------------------------


def from_gguf_blocks(data: np.ndarray, qtype: str, shape: tuple[int, int], dtype: str = "float32"):
    """GGUF blocks (uint8, one row of blocks per matrix row) of a GGUF_TYPES type as a host QuantizedMatrix:
    their integers as they are, their scales (and mins) as GGUF computes them, in f16. None where a scale
    does not fit f16 (the caller then loads the matrix dense)."""
    fmt, group, has_min, per_block, nbytes = GGUF_TYPES[qtype]
    n, k = shape
    b = np.ascontiguousarray(data, np.uint8).reshape(n * k // per_block, nbytes)
    q, scale, mn = _GGUF_BLOCKS[qtype](b)
    with np.errstate(over="ignore"):  # a scale past f16's range: checked below
        scale, mn = [None if a is None else np.asarray(a, np.float16).reshape(n, k // group) for a in (scale, mn)]
    if not all(a is None or np.isfinite(a).all() for a in (scale, mn)):
        return None
    q = q.reshape(n, -1)
    if fmt == "int8":
        q = q.view(np.int8)
    elif fmt == "iq4":
        q = iq4_words(q)
    return QuantizedMatrix(q, scale, mn, fmt, group, dtype)


class StoredForm(NamedTuple):
    """The form of a matrix a source stores quantized (what its `get_quantized` returns), known without
    reading it: its sources' `quantized_form(name)`."""

    fmt: str
    group: int
    has_min: bool
    nbytes: int


def _one_form(forms: list[StoredForm]) -> bool:
    """Whether matrices of these forms fuse as they are stored (their arrays' dtypes follow from the form);
    else load_field rounds them, whole, to MIXED_FORM. Loading and the size estimate both decide by this."""
    return len({(f.fmt, f.group, f.has_min) for f in forms}) == 1


def _placed_as_stored(fmt: str, int8_activations: bool) -> bool:
    """Whether a matrix stored in `fmt` is placed so: iq4 only where it multiplies int8 activations, whose
    kernel looks its levels up. For float products it goes as int8 holding its levels (`iq4_as_int8`): a float
    kernel looking them up ran slower than bf16 (Mistral-7B on an H100, 5.83 ms a token against 3.38 as Q8_0's
    form; BENCHMARKS.md runs 17, 23). Loading and the size estimate both decide by this."""
    return int8_activations or fmt != "iq4"


def iq4_as_int8(w: QuantizedMatrix) -> QuantizedMatrix:
    """An iq4 matrix as int8 in its groups: its levels as the integers, the same scales (the same values)."""
    return QuantizedMatrix(_iq4_levels(w), w.scale, None, "int8", w.group, w.dtype)


def iq4_words(packed: np.ndarray) -> np.ndarray:
    """Codes in int4's layout (N, K/2 bytes, as GGUF's IQ4 blocks hold them) as iq4's words: each word's
    nibbles sorted, its bytes' low nibbles into its low half-word, their high ones into its high half-word."""
    b = np.ascontiguousarray(packed).reshape(packed.shape[0], -1, 2)  # byte pairs: codes (j, j + G/2), (j + 1, ...)
    low, high = b & 15, b >> 4
    out = np.stack([low[..., 0] | low[..., 1] << 4, high[..., 0] | high[..., 1] << 4], axis=-1)  # (N, K/4, 2)
    return as_words(out.reshape(packed.shape[0], -1, 2, 2).transpose(0, 1, 3, 2).reshape(packed.shape))


# Each byte of iq4's words (two codes) to their two levels, the lower nibble's first.
_IQ4_PAIRS = np.array([[IQ4_LEVELS[b & 15], IQ4_LEVELS[b >> 4]] for b in range(256)], np.int8)


def _iq4_levels(w: QuantizedMatrix):
    """An iq4 matrix's levels (N, K) as int8, in numpy for a host matrix, else jnp."""
    xp = np if isinstance(w.q, np.ndarray) else jnp
    n, k = w.shape
    levels = xp.asarray(_IQ4_PAIRS)[w.q_bytes()]  # (N, K/2, 2): each word's eight codes' levels in nibble order
    # (N, groups, words, [low half-word, high], 4) to columns: the halves of a group, each its words' in turn
    return levels.reshape(n, k // w.group, w.group // 8, 2, 4).transpose(0, 1, 3, 2, 4).reshape(n, k)


def gguf_form(qtype: str, shape: tuple[int, int]) -> StoredForm:
    """What `from_gguf_blocks` makes of a `qtype` matrix of `shape` (the file's own bytes for Q8_0, Q4_0, Q4_1)."""
    fmt, group, has_min, _, _ = GGUF_TYPES[qtype]
    n, k = shape
    nbytes = n * k // (2 if fmt in NIBBLE_FORMATS else 1) + n * (k // group) * 2 * (2 if has_min else 1)
    return StoredForm(fmt, group, has_min, nbytes)


def _f16_field(b: np.ndarray, at: int) -> np.ndarray:
    """The f16 at bytes at, at + 1 of each block (row of b), as (blocks, 1) f32."""
    return b[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _blocks_as_stored(qtype: str):
    """Q8_0 / Q4_0 / Q4_1: a scale (and a min), then the values already in this module's layout."""
    body = 4 if GGUF_TYPES[qtype][2] else 2
    return lambda b: (b[:, body:], _f16_field(b, 0), _f16_field(b, 2) if body == 4 else None)


def _five_bits(b: np.ndarray, at: int) -> np.ndarray:
    """Q5_0 / Q5_1's values 0..31: 32 fifth bits in bytes at .. at + 3 (bit j: value j's), then 16 bytes of
    low nibbles (values j and j + 16)."""
    high = (b[:, at : at + 4].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    low = np.concatenate([b[:, at + 4 :] & 15, b[:, at + 4 :] >> 4], axis=1)
    return (low | (high.astype(np.uint8) << 4)).view(np.int8)


def _q5_0(b: np.ndarray):
    """d, then _five_bits; x = d (q - 16)."""
    return _five_bits(b, 2) - np.int8(16), _f16_field(b, 0), None


def _q5_1(b: np.ndarray):
    """d, m, then _five_bits; x = d q + m."""
    return _five_bits(b, 4), _f16_field(b, 0), _f16_field(b, 2)


def _iq4_nl(b: np.ndarray):
    """d, then 16 bytes of codes (low nibbles values j, high ones j + 16: int4's layout, which iq4_words sorts);
    x = d level."""
    return b[:, 2:], _f16_field(b, 0), None


def _iq4_xs(b: np.ndarray):
    """256 values as 8 sub-blocks of 32: d, the 6-bit scales' high 2 bits (a u16), their low 4 bits (4 bytes),
    then 8 sub-blocks of codes laid out as IQ4_NL's; x = d (scale - 32) level."""
    high = (b[:, 2:4].copy().view("<u2") >> np.arange(0, 16, 2, dtype=np.uint16)) & 3
    low = (b[:, 4:8, None] >> np.array([0, 4], np.uint8)).reshape(-1, 8) & 15
    scale = (low | (high.astype(np.uint8) << 4)).astype(np.float32) - 32
    return b[:, 8:], _f16_field(b, 0) * scale, None


def _crumbs(runs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K's 2-bit values: runs of 32 bytes, bits 2i of byte l holding value l + 32 i of the run's
    128, as (blocks, 16 sub-blocks of 16)."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((runs.reshape(runs.shape[0], -1, 1, 32) >> shifts) & 3).reshape(-1, 16, 16)


def _q2_k(b: np.ndarray):
    """256 values as 16 sub-blocks of 16: 16 bytes of 4-bit scales (low nibble) and mins (high), the values
    (_crumbs), d, dmin; x = d scale q - dmin min."""
    sc = b[:, :16].astype(np.float32)
    values = _crumbs(b[:, 16:80]).reshape(-1, 256).view(np.int8)
    return values, _f16_field(b, 80) * (sc % 16), -(_f16_field(b, 82) * (sc // 16))


def _q3_k(b: np.ndarray):
    """256 values as 16 sub-blocks of 16: 32 bytes of third bits (bit i of byte l: value l + 32 i; clear means
    4 less), the low two bits (_crumbs), 12 bytes of 6-bit scales (low nibbles in bytes 0-7, high pairs in 8-11),
    d; x = d (scale - 32) q with q in -4..3."""
    low = (b[:, 96:104, None] >> np.array([0, 4], np.uint8)).transpose(0, 2, 1).reshape(-1, 16) & 15
    high = (b[:, 104:108, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 2, 1).reshape(-1, 16) & 3
    scale = (low | (high << 4)).astype(np.float32) - 32
    third = ((b[:, None, :32] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, 16, 16)
    values = (_crumbs(b[:, 32:96]).astype(np.int8) - ((third ^ 1) << 2).astype(np.int8)).reshape(-1, 256)
    return values, _f16_field(b, 108) * scale, None


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 8 sub-blocks' 6-bit scales and mins, packed in bytes 4..15 (ggml's get_scale_min_k4)."""
    s = b[:, 4:16]
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _k_nibbles(runs: np.ndarray) -> np.ndarray:
    """4 runs of 32 bytes whose low nibbles are sub-block 2j, high ones 2j + 1: (blocks, 8 sub-blocks, 32)."""
    runs = runs.reshape(-1, 4, 1, 32)
    return np.concatenate([runs & 15, runs >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray):
    """256 values as 8 sub-blocks of 32: d, dmin, the scales and mins (_k_scales), the nibbles (_k_nibbles);
    x = d sc q - dmin m. Repacked to int4's layout (pack_int4) for groups of 32."""
    sc, m = _k_scales(b)
    values = _k_nibbles(b[:, 16:]).reshape(-1, 32)  # one sub-block a row
    return pack_int4(values, 32), _f16_field(b, 0) * sc, -(_f16_field(b, 2) * m)


def _q5_k(b: np.ndarray):
    """Q4_K's layout with 32 bytes of fifth bits before the nibbles (bit j of byte l: value l of sub-block j)."""
    sc, m = _k_scales(b)
    high = (b[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # (blocks, 32, 8 sub-blocks)
    values = _k_nibbles(b[:, 48:]) | (high.transpose(0, 2, 1) << 4)
    return values.reshape(-1, 256).view(np.int8), _f16_field(b, 0) * sc, -(_f16_field(b, 2) * m)


def _q6_k(b: np.ndarray):
    """256 values in two halves of 128: 64 bytes of low nibbles (values l and l + 64 of a half in byte l,
    l + 32 and l + 96 in byte l + 32), 32 bytes of 2-bit high parts (value l + 32 i in bits 2i of byte l), then
    16 int8 scales (one a run of 16 values) and d; x = d sc (q - 32)."""
    low = b[:, :128].reshape(-1, 2, 1, 64)
    low = np.concatenate([low & 15, low >> 4], axis=2)  # (blocks, half, 2, 64): values 0-63, then 64-127
    high = b[:, 128:192].reshape(-1, 2, 1, 32)
    high = np.concatenate([(high >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2).reshape(-1, 2, 2, 64)
    q = (low | (high << 4)).reshape(-1, 256).view(np.int8) - np.int8(32)
    return q, _f16_field(b, 208) * b[:, 192:208].view(np.int8), None


_GGUF_BLOCKS = {
    "Q8_0": _blocks_as_stored("Q8_0"),
    "Q4_0": _blocks_as_stored("Q4_0"),
    "Q4_1": _blocks_as_stored("Q4_1"),
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "IQ4_NL": _iq4_nl,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_XS": _iq4_xs,
}


def concat_rows(parts: list[QuantizedMatrix]) -> QuantizedMatrix | None:
    """Host matrices stacked by rows (a fused wqkv / w13), or None when their forms differ (_one_form)."""
    if not _one_form([p.stored_form for p in parts]):
        return None
    first = parts[0]
    cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
    mn = None if first.min is None else cat([p.min for p in parts])
    return dataclasses.replace(first, q=cat([p.q for p in parts]), scale=cat([p.scale for p in parts]), min=mn)


def map_rows(w: QuantizedMatrix, fn) -> QuantizedMatrix:
    """fn applied to the row axis of q, scale and min alike (e.g. GGUF's Q/K row permutation)."""
    return dataclasses.replace(w, q=fn(w.q), scale=fn(w.scale), min=None if w.min is None else fn(w.min))


# -- dequantize and products (jnp, inside the jitted graph) ---------------------------------


def _values(w: QuantizedMatrix) -> jax.Array:
    """q as f32 values before the scale: (N, K) for int8/fp8, (N, K) with the -8 offset applied for int4
    without a min, iq4's levels."""
    if w.fmt == "iq4":
        return _iq4_levels(w).astype(jnp.float32)
    if w.fmt == "int4":
        v = unpack_int4(w.q_bytes(), w.group).astype(jnp.float32)
        return v if w.min is not None else v - 8.0
    return w.q_bytes().astype(jnp.float32)


def mins_of(scale, mn):
    """The f32 mins of a matrix whose scales are `scale` and mins `mn` (f16 mins, or uint8 zero points z: the
    min -scale * z / ZERO_POINT_STEPS); numpy in, numpy out."""
    if mn.dtype == np.uint8:
        return -scale.astype(np.float32) * mn.astype(np.float32) * (1 / ZERO_POINT_STEPS)
    return mn.astype(np.float32)


def dequantize(w: QuantizedMatrix, dtype=None) -> jax.Array:
    """The dense (N, K) matrix, in `dtype` (default: the compute dtype), computed in f32."""
    n, k = w.shape
    g = w.group
    v = _values(w).reshape(n, k // g, g) * w.scale.astype(jnp.float32)[..., None]
    if w.min is not None:
        v = v + mins_of(w.scale, w.min)[..., None]
    return v.reshape(n, k).astype(dtype or w.dtype)


def matmul(x: jax.Array, w: QuantizedMatrix) -> jax.Array:
    """x @ W.T in f32 for x (S, K). On the CPU, int8 with a scale a row: an int8 product (`_int8_product`).
    Otherwise one token: a multiply-then-sum over the quantized values (one fusion that reads the quantized
    bytes, scales applied per group after the sum); a chunk: dequantize, then one matrix product."""
    if _multiplies_int8_on_cpu(w.fmt, w.group, w.shape[1]):
        return _int8_product(x, w)
    n, k = w.shape
    if x.shape[0] != 1:
        # The dequantize made to wait for x, so one matrix's dense copy is live at a time: XLA GPU otherwise
        # computed every layer's ahead of the first layer (int4 Mistral-7B, 512 tokens: 9.8 GB of temporaries).
        scale, x = lax.optimization_barrier((w.scale, x))
        w = dataclasses.replace(w, scale=scale)
        return jnp.einsum("si,oi->so", x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)
    g = w.group
    xg = x[0].astype(jnp.float32).reshape(k // g, g)
    # The values as (N, K / g, g), or with one scale a row as they are, (N, K): XLA CPU ran the sum over an
    # (N, 1, K) view 85-135x slower (int8 4096 x 4096: 143 ms against 1.7; BENCHMARKS.md, Quantization).
    view = (n, k // g, g) if g < k else (n, k)
    part = jnp.sum(_values(w).reshape(view) * xg.reshape(view[1:])[None], axis=-1).reshape(n, k // g)
    y = jnp.sum(part * w.scale.astype(jnp.float32), axis=-1)
    if w.min is not None:
        y = y + jnp.sum(mins_of(w.scale, w.min) * jnp.sum(xg, axis=-1)[None], axis=-1)
    return y[None]


# XLA CPU multiplies int8 by int8 into int32 through its own int8 matrix product, on a per-channel int8 matrix
# ~1.5x faster than dense f32 reads its 4x the bytes, where its product of int8 by f32 (any other form, too) is a
# convert-multiply-reduce fusion 1.35x (int8 per channel) to 31x slower than dense f32 (BENCHMARKS.md,
# Quantization). So x is split into ACT_PLANES int8 planes under one scale a row, each 1/254 of the last:
# three hold x to 2^-24 of its largest value, f32's own precision, so the product is the dequantized matrix's
# in f32 (two, 2^-16, failed a 1e-4 check against it; one, int8 activations a token, read +3.3% perplexity).
ACT_PLANES = 3


def _multiplies_int8_on_cpu(fmt: str, group: int | None, k: int) -> bool:
    """Whether a matrix in this form is multiplied by `_int8_product` (so the CPU keeps it quantized)."""
    return fmt == "int8" and group in (None, k) and jax.default_backend() == "cpu"


def int8_planes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (S, K) as ACT_PLANES int8 planes (ACT_PLANES, S, K) and their scales (ACT_PLANES, S, 1):
    x ~ sum_p scales[p] * planes[p], each plane the rounding of what the planes before it left."""
    rest = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(rest), axis=-1, keepdims=True) / 127
    scale = jnp.where(scale > 0, scale, 1.0)
    planes, scales = [], []
    for _ in range(ACT_PLANES):
        q = jnp.clip(jnp.round(rest / scale), -127, 127)
        planes.append(q.astype(jnp.int8))
        scales.append(scale)
        rest = rest - q * scale
        scale = scale / 254  # what is left is within half a step: |rest / scale| <= 127
    return jnp.stack(planes), jnp.stack(scales)


def _int8_product(x: jax.Array, w: QuantizedMatrix) -> jax.Array:
    """x @ W.T (S, N) in f32 for int8 W with a scale a row: x's int8 planes times W's integers, summed in int32
    (|sum| <= 127^2 K, within int32 for K < 133,000), then each plane's scale and the row's."""
    planes, scales = int8_planes(x)
    p, s, k = planes.shape
    # The planes as one (ACT_PLANES * S, K) operand, one matrix product: XLA CPU's int8 product costs a token's
    # three columns about what it costs one.
    sums = lax.dot_general(planes.reshape(p * s, k), w.q_bytes(), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.int32).astype(jnp.float32)  # fmt: skip
    # Each plane's rows scaled and added as slices: the same sum over a (planes, S, N) view decoded SmolLM2
    # 1.45x slower inside the decode loop (XLA CPU, 59 against 86 tok/s).
    y = sum(sums[i * s : (i + 1) * s] * scales[i] for i in range(p))
    return y * w.scale.astype(jnp.float32).reshape(1, -1)


def error_bound(w: np.ndarray, qm: QuantizedMatrix) -> np.ndarray:
    """The largest |W - dequantize(quantize(W))| rounding to nearest allows, per element (for tests)."""
    n, k = w.shape
    g = qm.group
    s = np.repeat(np.asarray(qm.scale, np.float32), g, axis=1)
    if qm.fmt in _FP8:
        f8 = _FP8[qm.fmt]
        info = ml_dtypes.finfo(f8)
        rel = 2.0 ** -(info.nmant + 1)  # half an ulp of the mantissa
        tiny = float(info.smallest_subnormal) / 2
        return s * np.maximum(rel * np.abs(w) / s, tiny) * (1 + 1e-6)
    bound = 0.5 * s
    if qm.min is not None and not qm.zero_points:  # an f16 min is rounded: the group's low end may sit below it
        m = np.repeat(np.asarray(qm.min, np.float32), g, axis=1)
        bound = bound + 2.0**-11 * np.abs(m)
    return bound * (1 + 1e-5) + 1e-7


# -- at load (build_weights) ----------------------------------------------------------------

# The weights pytree fields that hold (out, in) matrices a GEMV reads; MoE experts (3-D) stay dense.
FIELDS = ("embed", "lm_head", "wqkv", "wo", "w13", "w2")
# The embedding / output matrix is int8 under int4 and fp8 (llama.cpp's Q4 files keep Q6_K/Q8_0 there
# too): SmolLM2's tied 49152 x 576 table is the most sensitive matrix (see BENCHMARKS.md).
_EDGE = ("embed", "lm_head")


def field_form(choice: str, field: str, is_moe: bool) -> tuple[str, int | None] | None:
    """(format, group) that `choice` gives field `field`, ("native", None) to keep its stored blocks, or None
    for a dense matrix. The embedding / output matrix is int8 under int4 and fp8 (_EDGE)."""
    fmt, group = parse_choice(choice)
    if fmt is None or field not in FIELDS or (is_moe and field in ("w13", "w2")):
        return None
    if fmt in ("int4", "fp8_e4m3", "fp8_e5m2") and field in _EDGE:
        return "int8", None
    return fmt, group


# A fused matrix whose parts are stored in different forms (a Q4_K_M file's attn_v in Q6_K beside q and k in
# Q4_K) is rounded again, whole, to int8 in groups of 32 (Q8_0's form): at most 1/254 of a group's largest value
# on top of the parts' own rounding, at about half a bf16 matrix's bytes.
MIXED_FORM = ("int8", ACT_BLOCK)


def load_field(choice: str, field: str, names: list[str], source, read, dtype: str, *, is_moe: bool = False,
               int8_activations: bool = False):  # fmt: skip
    """Field `field` (its transformers tensors `names`, stacked by rows) as a host QuantizedMatrix, or None
    to load it dense: with choice "native", when every part is stored quantized in a mappable form
    (GGUF blocks of GGUF_TYPES, a quantized checkpoint), fused as stored (or in MIXED_FORM where the parts'
    forms differ; iq4 as int8 unless it will multiply int8 activations: _placed_as_stored); else quantized
    from floats."""
    form = field_form(choice, field, is_moe)
    if form is None:
        return None
    fmt, group = form
    if fmt == "native":
        getq = getattr(source, "get_quantized", None)
        parts = [getq(n, dtype) for n in names] if getq else [None]
        if any(p is None for p in parts):
            return None
        fused = concat_rows(parts)
        if fused is not None:
            return fused if _placed_as_stored(fused.fmt, int8_activations) else iq4_as_int8(fused)
        w = np.concatenate([np.asarray(dequantize(p, jnp.float32)) for p in parts], axis=0)
        fmt, group = MIXED_FORM
    else:
        w = np.concatenate([np.asarray(read(n), np.float32) for n in names], axis=0)
    return quantize(w, fmt, group, with_min=True, dtype=dtype)


def loaded_nbytes(choice: str, field: str, names: list[str], shapes: dict, source, dtype: str, *,
                  is_moe: bool = False, int8_activations: bool = False) -> int:  # fmt: skip
    """The bytes field `field` (its tensors `names`, of `shapes`) takes on the device once loaded as
    `load_field` and build_weights load it, found without reading any weights (for parallel.check_fits)."""
    n_rows = sum(shapes[n][0] for n in names)
    dense = n_rows * int(np.prod(shapes[names[0]][1:])) * np.dtype(dtype).itemsize
    form = field_form(choice, field, is_moe)
    if form is None:
        return dense
    (fmt, group), k = form, shapes[names[0]][1]
    stored_nbytes = None  # the parts' own bytes, where they are placed as stored
    if fmt == "native":
        stored = getattr(source, "quantized_form", lambda name: None)
        parts = [stored(n) for n in names]
        if None in parts:
            return dense
        if not _one_form(parts):
            fmt, group = MIXED_FORM
        elif _placed_as_stored(parts[0].fmt, int8_activations):
            fmt, group, stored_nbytes = parts[0].fmt, parts[0].group, sum(p.nbytes for p in parts)
        else:  # iq4 placed as int8 (iq4_as_int8)
            fmt, group = "int8", parts[0].group
    if dequantizes_at_load(fmt, group, k):
        return dense
    if stored_nbytes is not None:
        return stored_nbytes
    one_row = quantize(np.ones((1, k), np.float32), fmt, group, with_min=True, dtype=dtype)
    return n_rows * one_row.nbytes


# On the CPU, XLA's dequantize-in-graph decode is 7-31x slower than dense f32 (BENCHMARKS.md,
# Quantization), so a quantized matrix is dequantized once, at load, into the compute dtype there; all but
# int8 with a scale a row, which the CPU multiplies as integers (_int8_product).
DEQUANTIZE_ON_CPU = True


def dequantizes_at_load(fmt: str | None = None, group: int | None = None, k: int | None = None) -> bool:
    """Whether a quantized matrix loads dense: on the CPU, unless its form (fmt, group, row length k) is one the
    CPU multiplies quantized; without a form, whether the CPU's other forms do."""
    return DEQUANTIZE_ON_CPU and jax.default_backend() == "cpu" and not _multiplies_int8_on_cpu(fmt, group, k)


def for_device(w: QuantizedMatrix):
    """What build_weights places for a host QuantizedMatrix: itself, or on the CPU (dequantizes_at_load) its
    dense matrix."""
    return np.asarray(dequantize(w)) if dequantizes_at_load(w.fmt, w.group, w.shape[1]) else w


def auto_choice(source) -> str:
    """What `load_model(quant=None)` does: matrices stored quantized (a checkpoint's, a GGUF file's blocks) stay
    so ("native"), the bytes and values the file holds, except on the CPU where the source has a dense form of
    its own (a GGUF file: gguf's dequantization, as transformers loads it): the CPU computes with weights
    dequantized at load anyway (BENCHMARKS.md, Quantization). Anything else loads dense ("none")."""
    if not getattr(source, "quantized", False):
        return "none"
    return "none" if getattr(source, "dense_form", False) and dequantizes_at_load() else "native"


# -- checkpoints (scripts/quantize.py writes them, loading/hf.py reads them) -----------------


def stored_parts(w: QuantizedMatrix) -> tuple[dict, dict[str, np.ndarray]]:
    """The config entry and the tensors (suffix -> host array) a checkpoint stores for w."""
    parts = {"q": np.asarray(w.q_bytes()), "scale": np.asarray(w.scale)}
    if w.min is not None:
        parts["min"] = np.asarray(w.min)
    return {"format": w.fmt, "group": w.group, "min": w.min is not None}, parts


def from_stored(spec: dict, get, dtype: str = "float32") -> QuantizedMatrix:
    """The inverse of `stored_parts`: `get(suffix)` reads <name>.q, <name>.scale, <name>.min."""
    fmt, group = spec.get("format"), spec.get("group")
    if fmt not in FORMATS or not isinstance(group, int) or group < 1:
        raise UserError(f"bad entry {spec!r} in config.json's quantization section")
    return QuantizedMatrix(get("q"), get("scale"), get("min") if spec.get("min") else None, fmt, group, dtype)
