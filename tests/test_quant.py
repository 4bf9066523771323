"""Quantized weights (yalm_jax/quant.py), their GEMV kernel, GGUF block mapping, checkpoints and the KV dtype.

Inputs are fresh random draws every run (the seed is printed). Kernels run in
Pallas' interpreter on the CPU at grids of <= 16 steps, into NaN-poisoned
output buffers. Model-level tests keep quantized matrices in the pytree (the
CPU default dequantizes them at load, which would test nothing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference, decode_attention_update
from pallas_kernels.gemv_quant import (
    CONFIGS,
    DEFAULT_CONFIG,
    config_for,
    config_kinds,
    gemv_quant,
    gemv_quant_reference,
)
from yalm_jax import model, ops, quant

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (format, group, mins: False, True (quantize's zero points, --quant=int4's) or "f16" (GGUF's Q4_1 form))
FORMATS = [
    ("int8", None, False),  # per output channel
    ("int8", 32, False),  # GGUF Q8_0's form (and Q5_0's)
    ("int8", 16, False),  # Q6_K's
    ("int4", 32, False),  # Q4_0's
    ("int4", 32, True),  # --quant=int4's
    ("int4", 32, "f16"),  # Q4_1's
    ("int4", 64, True),
    ("int4", 128, False),
    ("fp8_e4m3", None, False),
    ("fp8_e5m2", None, False),
    ("fp8_e4m3", 32, False),  # --quant=fp8's form
    ("fp8_e5m2", 32, False),
]
FMT_IDS = [f"{f}-g{g}-{ {True: 'zp', 'f16': 'min'}.get(m, 'sym') }" for f, g, m in FORMATS]
FMT_ID = dict(zip(FORMATS, FMT_IDS))


@pytest.fixture
def rng():
    seed = time.time_ns() % (2**31)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _quantized_in_the_pytree(monkeypatch):
    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)


def _quantize(w, fmt, group, with_min, **kw):
    """quant.quantize's matrix; with_min "f16": its zero points as f16 mins (GGUF's Q4_1 form)."""
    qm = quant.quantize(w, fmt, group, with_min=bool(with_min), **kw)
    if with_min == "f16":
        qm = dataclasses.replace(qm, min=quant.mins_of(qm.scale, qm.min).astype(np.float16))
    return qm


def test_int4_zero_point_known_answer():
    # One group from -1.5 to 3 (0 at the 9th step, then 1.5 at every 5th): scale 4.5 / 15 = 0.3, zero point
    # z = 16 * 1.5 / 0.3 = 80 (min -1.5), every value on the grid; a group all above 0 widens its range to 0.
    w = np.zeros((2, 32), np.float32)
    w[0, :16] = np.linspace(-1.5, 3.0, 16)
    w[1] = np.linspace(0.5, 2.0, 32)
    qm = quant.quantize(w, "int4", 32, with_min=True)
    assert qm.min.dtype == np.uint8 and qm.min[:, 0].tolist() == [80, 0]
    np.testing.assert_allclose(np.asarray(qm.scale, np.float32)[:, 0], [0.3, 2.0 / 15], rtol=1e-3)
    np.testing.assert_allclose(quant.mins_of(np.asarray(qm.scale), qm.min)[0, 0], -1.5, rtol=1e-3)
    # On the grid but for the scale's rounding to f16 (0.2998...): at most 15 of its 2e-4.
    np.testing.assert_allclose(np.asarray(quant.dequantize(qm, jnp.float32))[0], w[0], atol=4e-3)


def _weights(rng, n, k):
    # Rows of different magnitudes, a few outliers: per-row and per-group scales must both matter.
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2.0, (n, 1)).astype(np.float32)
    w[rng.integers(0, n, 4), rng.integers(0, k, 4)] *= 8
    return w


@pytest.mark.parametrize("fmt,group,with_min", FORMATS, ids=FMT_IDS)
def test_quantize_dequantize_within_the_format_bound(rng, fmt, group, with_min):
    w = _weights(rng, 48, 512)
    qm = _quantize(w, fmt, group, with_min)
    assert qm.shape == w.shape and qm.group == (group or 512)
    err = np.abs(np.asarray(quant.dequantize(qm, jnp.float32)) - w)
    bound = quant.error_bound(w, qm)
    assert (err <= bound).all(), f"worst excess {float((err - bound).max())}"
    assert err.max() > 0.05 * bound.max()  # the bound is not vacuous
    bits = {"int8": 8, "int4": 4}.get(fmt, 8)
    assert qm.q.nbytes == w.size * bits // 8


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("group", [None, 32])
def test_fp8_scale_is_the_candidate_with_least_error(rng, fmt, group):
    # The reference rounds with ml_dtypes every candidate scale, absmax / max * 2^(j / steps), as stored.
    w = _weights(rng, 48, 512)
    qm = quant.quantize(w, fmt, group)
    g = group or 512
    f8 = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}[fmt]
    top = float(ml_dtypes.finfo(f8).max)
    wg = w.reshape(48, 512 // g, g)
    base = np.abs(wg).max(-1) / top

    def sq_err(s):
        s = s.astype(np.float16 if group else np.float32).astype(np.float32)
        q = np.clip(wg / s[..., None], -top, top).astype(f8).astype(np.float32)
        return ((q * s[..., None] - wg) ** 2).sum(-1)

    steps = quant.FP8_SCALE_STEPS
    errs = np.stack([sq_err(base * np.float32(2.0 ** (j / steps))) for j in range(steps)])
    got = ((np.asarray(quant.dequantize(qm, jnp.float32)).reshape(wg.shape) - wg) ** 2).sum(-1)
    # quantize's candidates come from base * 2 ** (j / steps) inside a jitted loop, which can differ from
    # numpy's by an ulp and so round to the neighbouring f16 scale: a rare group gets a slightly different
    # candidate (13 groups in 230,400 over 150 seeds, error 2.7% below to 4.4% above the reference's least).
    # Every other group must have exactly the least error.
    same = np.isclose(got, errs.min(0), rtol=1e-4)
    assert same.mean() > 0.99, f"{(~same).sum()} of {same.size} groups did not take the least-error scale"
    np.testing.assert_allclose(got, errs.min(0), rtol=6e-2)
    assert (errs.argmin(0) > 0).mean() > 0.5  # most groups gain over absmax / max
    assert qm.scale.dtype == (np.float16 if group else np.float32)


def test_int4_packing_round_trips(rng):
    q = rng.integers(0, 16, (6, 256)).astype(np.uint8)
    for g in quant.INT4_GROUPS:
        packed = quant.pack_int4(q, g)
        assert packed.shape == (6, 128)
        np.testing.assert_array_equal(quant.unpack_int4(packed, g), q)
        np.testing.assert_array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed), g)), q)


def test_int4_group_falls_back_to_a_divisor():
    assert quant.pick_group(576, 128) == 64 and quant.pick_group(1536, 128) == 128
    assert quant.parse_choice("int4:32") == ("int4", 32) and quant.parse_choice("fp8") == ("fp8_e4m3", 32)
    assert quant.parse_choice("fp8_e5m2") == ("fp8_e5m2", 32) and quant.parse_choice("int8") == ("int8", None)
    with pytest.raises(ValueError):
        quant.parse_choice("int3")


def test_gguf_source_serves_blocks_in_transformers_row_order(smollm2_gguf):
    # q_proj (Q4_1, rows permuted back per head), v_proj (Q4_1) and the Q8_0 embedding, straight from the file.
    from yalm_jax.loading.gguf import open_gguf

    _, source, _ = open_gguf(smollm2_gguf)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.v_proj.weight"):
        qm = source.get_quantized(name)
        assert qm.fmt == "int4" and qm.group == 32 and qm.min is not None
        np.testing.assert_array_equal(np.asarray(quant.dequantize(qm, jnp.float32)), source.get(name))
    emb = source.get_quantized("model.embed_tokens.weight")
    assert emb.fmt == "int8" and emb.group == 32
    rows = np.array([0, 1, 7, 4000, 49151])
    np.testing.assert_array_equal(np.asarray(emb[rows]), source.get("model.embed_tokens.weight")[rows])
    assert source.get_quantized("model.layers.0.input_layernorm.weight") is None


# -- the GEMV kernel ------------------------------------------------------------------------

SMALL = (8, 64, 4, 2)  # block_n, block_k (stored columns), warps, stages: grids of 8 steps below


def _check_gemv(rng, fmt, group, with_min, dtype, n=64, k=256, config=SMALL, **form):
    qm = jax.device_put(dataclasses.replace(_quantize(_weights(rng, n, k), fmt, group, with_min), dtype=dtype))
    x = jnp.asarray(rng.standard_normal(k), dtype)
    gated = form.pop("gated", False)
    n_out = n // 2 if gated else n
    args = {"gated": gated, "activation": form.pop("activation", "silu")}
    if form.pop("bias", False):
        args["bias"] = jnp.asarray(rng.standard_normal(n_out), dtype)
    if form.pop("residual", False):
        args["residual"] = jnp.asarray(rng.standard_normal(n_out), dtype)
    if form.pop("norm", False):
        args["norm"] = (jnp.asarray(1 + 0.1 * rng.standard_normal(k), dtype), 1e-5)
    poison = jnp.full((n_out,), jnp.nan, dtype)
    out = jax.jit(lambda w, x, p: gemv_quant(w, x, config=config, out=p, interpret=INTERPRET, **args))(qm, x, poison)
    ref = gemv_quant_reference(qm, x, **args)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == (n_out,) and np.isfinite(out).all(), "unwritten (NaN) output"
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}[dtype]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < tol
    return qm, x, args, ref


@pytest.mark.parametrize("fmt,group,with_min", FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize(
    "form",
    [{"residual": True, "bias": True}, {"gated": True, "norm": True}, {"gated": True, "activation": "gelu_tanh"}],
    ids=["res_bias", "gated_norm", "gated_gelu"],
)
def test_gemv_quant_matches_reference(rng, fmt, group, with_min, form):
    _check_gemv(rng, fmt, group, with_min, jnp.float32, n=128 if form.get("gated") else 64, **dict(form))


@pytest.mark.parametrize(
    "fmt,group,with_min", [FORMATS[i] for i in (1, 4, 5, 8, 10)], ids=[FMT_IDS[i] for i in (1, 4, 5, 8, 10)]
)
def test_gemv_quant_bf16_with_norm(rng, fmt, group, with_min):
    _check_gemv(rng, fmt, group, with_min, jnp.bfloat16, norm=True)


@pytest.mark.parametrize("fmt,group,with_min", [("int4", 32, True), ("int8", None, False)])
def test_gemv_quant_writes_f32_for_a_16_bit_x(rng, fmt, group, with_min):
    # Tensor parallelism sums the devices' partial products in f32 (ops.linear): the kernel writes them unrounded.
    qm = _quantize(_weights(rng, 64, 256), fmt, group, with_min, dtype="bfloat16")
    qm, x = jax.device_put(qm), jnp.asarray(rng.standard_normal(256), jnp.bfloat16)
    out = gemv_quant(qm, x, config=SMALL, out_dtype=jnp.float32, interpret=INTERPRET)
    ref = np.asarray(gemv_quant_reference(qm, x, out_dtype=jnp.float32))
    assert out.dtype == jnp.float32 and _rel(np.asarray(out), ref) < 1e-5
    assert _rel(np.asarray(out), np.asarray(ref.astype(ml_dtypes.bfloat16), np.float32)) > 1e-4


@pytest.mark.parametrize("fmt,group,with_min", [("int4", 64, True), ("int4", 32, False), ("int8", 32, False),
                                                ("int8", None, False), ("fp8_e4m3", 32, False)])  # fmt: skip
@pytest.mark.parametrize("k", [576, 896, 1536])
def test_gemv_quant_smollm2_row_length(rng, fmt, group, with_min, k):
    # SmolLM2's rows (576 and 1536 columns; Qwen2-0.5B's 896) hold no power of two of chunks: chunks of 256
    # stored bytes leave the last one part-empty (masked), as the default tile's one chunk a row does.
    for config in (SMALL, (8, 256, 4, 2)):
        _check_gemv(rng, fmt, group, with_min, jnp.float32, n=64, k=k, norm=True, config=config)


# -- int8 activations -----------------------------------------------------------------------

ACT8_FORMATS = [("int8", None, False), ("int8", 32, False), ("int4", 32, False), ("int4", 32, True),
                ("int4", 32, "f16")]
ACT8_IDS = [FMT_ID[f] for f in ACT8_FORMATS]


def test_int8_activation_rounds_each_block_within_half_a_step(rng):
    x = rng.standard_normal((2, 256)).astype(np.float32) * rng.uniform(0.01, 5, (2, 256)).astype(np.float32)
    x[0, rng.integers(0, 256, 3)] = 0  # a zero may stand anywhere; an all-zero block below
    x[1, 64:96] = 0
    r = np.asarray(quant.round_activations(jnp.asarray(x))).reshape(2, -1, quant.ACT_BLOCK)
    xb = x.reshape(2, -1, quant.ACT_BLOCK)
    step = np.abs(xb).max(-1, keepdims=True) / 127
    q = np.divide(r, step, out=np.zeros_like(r), where=step > 0)
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)  # each value an integer number of its block's steps
    np.testing.assert_array_equal(np.abs(np.round(q)).max(-1), np.where(step[..., 0] > 0, 127, 0))
    assert (np.abs(r - xb) <= step / 2 * (1 + 1e-5)).all()
    assert (r[1, 2] == 0).all() and (r[xb == 0] == 0).all()


def test_int8_activation_of_a_normed_input_rounds_x_times_g(rng):
    x = rng.standard_normal((2, 256)).astype(np.float32) * rng.uniform(0.01, 5, (2, 256)).astype(np.float32)
    g = (1 + 0.3 * rng.standard_normal(256)).astype(np.float32)
    eps = 1e-5
    r = np.asarray(quant.round_activations(jnp.asarray(x), (jnp.asarray(g), eps))).reshape(2, -1, quant.ACT_BLOCK)
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1) + eps)[:, None, None]
    normed = (x * g).reshape(r.shape) / rms  # rms_norm(x) with weight g
    step = np.abs(normed).max(-1, keepdims=True) / 127
    # Rounded within half a step of rms_norm(x), each block to integers of its own step...
    assert (np.abs(r - normed) <= step / 2 * (1 + 1e-4)).all()
    q = r / step
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    # ...which are those of x * g: the norm's 1 / rms, the same for every block, changes no integer.
    xg = (x * g).reshape(r.shape)
    np.testing.assert_array_equal(np.round(q), np.round(xg * 127 / np.abs(xg).max(-1, keepdims=True)))


def test_normed_int8_vector_holds_what_round_activations_gives(rng):
    x = jnp.asarray(rng.standard_normal(256) * rng.uniform(0.01, 5, 256), jnp.float32)
    norm = (jnp.asarray(1 + 0.3 * rng.standard_normal(256), jnp.float32), 1e-5)
    v = quant.to_int8_vector(x, norm)
    assert v.eps == 1e-5 and v.sumsq.shape == (256 // quant.ACT_BLOCK,)
    # Its 1 / rms from the blocks' sums (the kernels' order) against jnp.mean's: the same to float precision.
    np.testing.assert_allclose(np.asarray(v.values()), np.asarray(quant.round_activations(x, norm)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(v.words), np.asarray(quant.to_int8_vector(x * norm[0]).words))


def _a8_case(rng, fmt, group, with_min, form, dtype):
    """A (n, 256) matrix of `fmt` as quantize leaves it and marked for int8 activations, and gemv_quant's
    keyword arguments for `form` (gated, norm, bias, residual), all drawn fresh."""
    n = 128 if form.get("gated") else 64
    plain = jax.device_put(dataclasses.replace(_quantize(_weights(rng, n, 256), fmt, group, with_min),
                                               dtype=dtype))  # fmt: skip
    n_out = n // 2 if form.get("gated") else n
    args = {"gated": form.get("gated", False)}
    if form.get("norm"):
        args["norm"] = (jnp.asarray(1 + 0.2 * rng.standard_normal(256), dtype), 1e-5)
    for field in ("bias", "residual"):
        if form.get(field):
            args[field] = jnp.asarray(rng.standard_normal(n_out), dtype)
    return plain, quant.with_int8_activations(plain), args, n_out


@pytest.mark.parametrize("fmt,group,with_min", ACT8_FORMATS, ids=ACT8_IDS)
@pytest.mark.parametrize("form", [{"residual": True, "bias": True}, {"gated": True, "norm": True}, {"norm": True}],
                         ids=["res_bias", "gated_norm", "norm"])  # fmt: skip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv_quant_with_int8_activations_matches_reference(rng, fmt, group, with_min, form, dtype):
    plain, qm, args, n_out = _a8_case(rng, fmt, group, with_min, form, dtype)
    x = jnp.asarray(rng.standard_normal(256) * rng.uniform(0.1, 3, 256), dtype)
    poison = jnp.full((n_out,), jnp.nan, dtype)
    out = jax.jit(lambda w, x, p: gemv_quant(w, x, config=SMALL, out=p, interpret=INTERPRET, **args))(qm, x, poison)
    ref = gemv_quant_reference(qm, x, **args)
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    # The kernel rounds x (normed) as round_activations does and its integer products are exact, so it is as
    # close to its reference as the float kernel is to its own: in bf16, the output's rounding (over 40 draws
    # of each form: median 0.25%, worst 0.66%). A normed x's integers are those of x * g, which no order of
    # the norm's sums changes (in run 10's form, x normed and then rounded, a bf16 step of the norm became
    # whole int8 steps: worst 3.7%).
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}[dtype]
    assert _rel(np.asarray(out, np.float32), np.asarray(ref, np.float32)) < tol
    # And the rounding of x to int8 moves the product by about a step of it (1/254 of a block's absmax); the
    # gate's product, silu(g) * u, compounds two such moves (bf16, 150 draws of each int8 / int4 form: normed
    # median 0.8%, worst 1.4%; gated median 1.2%, worst 4.1%).
    unrounded = gemv_quant_reference(plain, x, **args)
    bound = 6e-2 if args["gated"] else 3e-2
    assert _rel(np.asarray(ref, np.float32), np.asarray(unrounded, np.float32)) < bound


GGUF_ONLY_FORMS = [("Q5_K", False), ("Q5_K", True), ("Q2_K", False), ("IQ4_XS", True), ("IQ4_NL", True)]


@pytest.mark.parametrize("qtype,int8_activations", GGUF_ONLY_FORMS,
                         ids=[f"{q}-{'int8_activations' if a else 'float'}" for q, a in GGUF_ONLY_FORMS])  # fmt: skip
@pytest.mark.parametrize("form", [{"residual": True, "bias": True}, {"gated": True, "norm": True}],
                         ids=["res_bias", "gated_norm"])  # fmt: skip
def test_gguf_only_forms_through_the_kernel_and_xla(rng, qtype, int8_activations, form):
    # The forms only GGUF's blocks make, on random bytes: int8 with a min a group (Q5_K's groups of 32, values
    # 0..31, and Q2_K's of 16, 0..3) and iq4 (IQ4_XS's and IQ4_NL's codes for levels, looked up in the integer
    # path's kernel; float products take it as int8): the GEMV kernel's float and integer paths and the xla
    # product against their references.
    from test_gguf import random_blocks

    n = 128 if form.get("gated") else 64
    qm = jax.device_put(quant.from_gguf_blocks(random_blocks(qtype, (n, 256), rng, 0.01), qtype, (n, 256)))
    assert qm.stored_form[:3] == quant.GGUF_TYPES[qtype][:3]
    x = jnp.asarray(rng.standard_normal(256), jnp.float32)
    dense = np.asarray(quant.dequantize(qm, jnp.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(quant.matmul)(x[None], qm))[0], dense @ np.asarray(x), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    qm = quant.with_int8_activations(qm) if int8_activations else qm
    n_out = n // 2 if form.get("gated") else n
    args = {"gated": form.get("gated", False)}
    if form.get("norm"):
        args["norm"] = (jnp.asarray(1 + 0.2 * rng.standard_normal(256), jnp.float32), 1e-5)
    for field in ("bias", "residual"):
        if form.get(field):
            args[field] = jnp.asarray(rng.standard_normal(n_out), jnp.float32)
    out = gemv_quant(qm, x, config=SMALL, interpret=INTERPRET, **args)
    assert _rel(np.asarray(out), np.asarray(gemv_quant_reference(qm, x, **args))) < 1e-5
    if int8_activations and not form.get("norm"):  # x as a producer's kernel hands it over
        xv = quant.to_int8_vector(x)
        out = gemv_quant(qm, xv, config=SMALL, interpret=INTERPRET, **args)
        assert _rel(np.asarray(out), np.asarray(gemv_quant_reference(qm, xv, **args))) < 1e-5


def test_iq4_multiplies_int8_activations_only(rng):
    # Its levels' lookup is the integer path's; float products take it as int8 holding its levels.
    from test_gguf import random_blocks

    qm = quant.from_gguf_blocks(random_blocks("IQ4_XS", (64, 256), rng, 0.01), "IQ4_XS", (64, 256))
    x = jnp.asarray(rng.standard_normal(256), jnp.float32)
    with pytest.raises(ValueError, match="iq4"):
        gemv_quant(jax.device_put(qm), x, config=SMALL, interpret=INTERPRET)
    as_int8 = jax.device_put(quant.iq4_as_int8(qm))
    assert (as_int8.fmt, as_int8.group) == ("int8", 32)
    out = gemv_quant(as_int8, x, config=SMALL, interpret=INTERPRET)
    assert _rel(np.asarray(out), np.asarray(gemv_quant_reference(jax.device_put(qm), x))) < 1e-5


@pytest.mark.parametrize("fmt,group,with_min", [("int4", 32, True), ("int8", 32, False), ("int8", None, False)])
def test_gemv_quant_with_int8_activations_smollm2_row_length(rng, fmt, group, with_min):
    # 576 columns (SmolLM2's dim, its shipped Q4_1 / Q8_0 blocks): 18 blocks of 32, chunks of two.
    qm = _quantize(_weights(rng, 64, 576), fmt, group, with_min)
    qm = quant.with_int8_activations(jax.device_put(qm))
    x = jnp.asarray(rng.standard_normal(576), jnp.float32)
    norm = (jnp.asarray(1 + 0.1 * rng.standard_normal(576), jnp.float32), 1e-5)
    out = gemv_quant(qm, x, norm=norm, interpret=INTERPRET)
    assert _rel(np.asarray(out), np.asarray(gemv_quant_reference(qm, x, norm=norm))) < 1e-5


def test_int8_vector_holds_what_round_activations_gives(rng):
    x = rng.standard_normal(256).astype(np.float32) * rng.uniform(0.01, 5, 256).astype(np.float32)
    x[96:128] = 0  # an all-zero block
    v = quant.to_int8_vector(jnp.asarray(x))
    assert v.shape == (256,) and v.words.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(v.values()), np.asarray(quant.round_activations(jnp.asarray(x))))
    q = np.asarray(v.words).view(np.int8).reshape(-1, quant.ACT_BLOCK).astype(np.float32)  # bytes, lowest first
    np.testing.assert_array_equal(np.asarray(v.qsum), q.sum(-1))
    # absmax / 127 to within one f32 ulp: XLA may divide by the constant as a multiply by its reciprocal.
    want = (np.abs(x).reshape(-1, quant.ACT_BLOCK).max(-1) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_max_ulp(np.asarray(v.scale), want, maxulp=1)


@pytest.mark.parametrize("fmt,group,with_min", ACT8_FORMATS, ids=ACT8_IDS)
@pytest.mark.parametrize("form", [{"residual": True, "bias": True}, {"gated": True}, {"gated": True, "normed": True}],
                         ids=["res_bias", "gated", "gated_normed"])  # fmt: skip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv_quant_reads_an_int8_vector(rng, fmt, group, with_min, form, dtype):
    _, qm, args, n_out = _a8_case(rng, fmt, group, with_min, form, dtype)
    x = jnp.asarray(rng.standard_normal(256) * rng.uniform(0.1, 3, 256), jnp.float32)
    # normed: rms_norm(x) rounded as wo's kernel writes it for w13, which applies the norm's 1 / rms.
    norm = (jnp.asarray(1 + 0.2 * rng.standard_normal(256), jnp.float32), 1e-5) if form.get("normed") else None
    xv = quant.to_int8_vector(x, norm)
    poison = jnp.full((n_out,), jnp.nan, dtype)
    out = jax.jit(lambda w, x, p: gemv_quant(w, x, config=SMALL, out=p, interpret=INTERPRET, **args))(qm, xv, poison)
    ref = gemv_quant_reference(qm, xv, **args)
    assert out.dtype == dtype  # w's compute dtype: an Int8Vector has none of its own
    # Exact integer products and f32 scales; the one rounding is to the output's dtype.
    assert _rel(np.asarray(out, np.float32), np.asarray(ref, np.float32)) < (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("fmt,group,with_min", ACT8_FORMATS, ids=ACT8_IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm_out", [False, True], ids=["h", "normed"])
def test_gemv_quant_int8_out_rounds_what_it_writes(rng, fmt, group, with_min, dtype, norm_out):
    # w13's form in the model: gated, normed, writing h and h rounded for the next matrix; normed: as wo's
    # kernel writes the FFN's input, rms_norm(y) rounded for w13 (here after a gated, normed product too).
    _, qm, args, n_out = _a8_case(rng, fmt, group, with_min, {"gated": True, "norm": True}, dtype)
    x = jnp.asarray(rng.standard_normal(256) * rng.uniform(0.1, 3, 256), dtype)
    nxt = (jnp.asarray(1 + 0.2 * rng.standard_normal(n_out), dtype), 1e-6) if norm_out else None
    y, yv = gemv_quant(qm, x, int8_out=True, norm_out=nxt, config=SMALL, interpret=INTERPRET, **args)
    plain = gemv_quant(qm, x, config=SMALL, interpret=INTERPRET, **args)
    # y is the product (the tolerances of test_gemv_quant_with_int8_activations_matches_reference's normed
    # case), and its block_n, grown to whole blocks of 32, does not change a row's sums.
    ref = gemv_quant_reference(qm, x, **args)
    assert _rel(np.asarray(y, np.float32), np.asarray(ref, np.float32)) < (1e-5 if dtype == jnp.float32 else 5e-2)
    assert _rel(np.asarray(y, np.float32), np.asarray(plain, np.float32)) < 1e-6
    want = quant.to_int8_vector(y, nxt)  # y rounded as written: the same integers, bit for bit
    for got, ref in zip((yv.words, yv.scale, yv.qsum), (want.words, want.scale, want.qsum)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert yv.eps == want.eps
    if norm_out:  # each block's sum of y^2, in the kernel's order of sums
        np.testing.assert_allclose(np.asarray(yv.sumsq), np.asarray(want.sumsq), rtol=1e-6)


def test_int8_vector_misuse_is_refused(rng):
    qm = quant.with_int8_activations(quant.quantize(_weights(rng, 48, 256), "int8", None))
    x = jnp.asarray(rng.standard_normal(256), jnp.float32)
    with pytest.raises(ValueError, match="divisible by 32"):
        gemv_quant(qm, x, int8_out=True, interpret=INTERPRET)  # 48 rows: a block would straddle programs
    with pytest.raises(ValueError, match="without a norm"):
        gemv_quant(qm, quant.to_int8_vector(x), norm=(x, 1e-5), interpret=INTERPRET)
    with pytest.raises(ValueError, match="norm_out"):
        gemv_quant(qm, x, norm_out=(x, 1e-5), interpret=INTERPRET)
    # A normed vector goes only where its producer's norm applies (ops.linear_for_next's next_norm).
    normed = quant.to_int8_vector(x, (x, 1e-5))
    for norm in (None, (x, 1e-6)):
        with pytest.raises(ValueError, match="next_norm"):
            ops.linear(normed, qm, norm=norm, backend="pallas")


def test_only_a_kernel_on_the_integer_path_rounds_its_output(rng):
    # A float-path producer (a Q3_K_M file's w13: int8 in groups of 16) leaves the rounding of h to w2's
    # kernel: rounding it itself needs 32 rows a program, which spill on the float path's tiles.
    from test_gguf import random_blocks

    from pallas_kernels.gemv_quant import MIN_INT8_OUT_PROGRAMS, rounds_output_for

    rows = quant.ACT_BLOCK * MIN_INT8_OUT_PROGRAMS
    int4_a8 = quant.with_int8_activations(quant.quantize(_weights(rng, 2 * rows, 64), "int4", 32))
    q3_k = quant.from_gguf_blocks(random_blocks("Q3_K", (2 * rows, 256), rng), "Q3_K", (2 * rows, 256))
    assert rounds_output_for(int4_a8, int4_a8, gated=True)
    assert not rounds_output_for(quant.with_int8_activations(q3_k), int4_a8, gated=True)
    assert not rounds_output_for(int4_a8, quant.quantize(_weights(rng, 64, 64), "int4", 32), gated=True)


def test_config_kinds_name_the_kernel_path(rng):
    # Tiles are looked up by the kernel's path, not the format: fp8 and GGUF's Q8_0 form share the grouped 8-bit
    # path, int8 and fp8 with one scale a row the per-channel one; iq4 and int4 with mins have tiles of their own
    # before int4's; every kind in CONFIGS is one of them.
    from test_gguf import random_blocks

    w = _weights(rng, 64, 256)
    cases = {("int8", None): "8bit", ("fp8_e4m3", None): "8bit", ("int8", 32): "8bit_groups",
             ("fp8_e4m3", 32): "8bit_groups", ("fp8_e5m2", 32): "8bit_groups", ("int4", 32): "4bit"}  # fmt: skip
    kinds = set()
    for (fmt, group), kind in cases.items():
        qm = quant.quantize(w, fmt, group)
        a8 = quant.with_int8_activations(qm)
        got = (config_kinds(qm), config_kinds(a8))
        assert got == ((kind,), (kind + "_a8" if a8.int8_activations else kind,)), (fmt, group, got)
        kinds.update(got[0] + got[1])
    iq4 = quant.from_gguf_blocks(random_blocks("IQ4_NL", (64, 256), rng), "IQ4_NL", (64, 256))
    assert config_kinds(quant.with_int8_activations(iq4)) == ("iq4_a8", "4bit_a8")
    int4_min = quant.quantize(w, "int4", 32, with_min=True)  # --quant=int4's form, GGUF's Q4_1
    assert config_kinds(int4_min) == ("4bit_min", "4bit")
    assert config_kinds(quant.with_int8_activations(int4_min)) == ("4bit_min_a8", "4bit_a8")
    kinds.update(["iq4_a8", "4bit_min", "4bit_min_a8"])
    assert {key[0] for key in CONFIGS} <= kinds
    # Where iq4 has no tile of its own for a shape it takes int4's; with neither, DEFAULT_CONFIG.
    shape = (64, 256, False)
    monkey = {("4bit_a8", *shape): (8, 128, 4, 2)}
    with mock.patch.dict(CONFIGS, monkey):
        assert config_for(quant.with_int8_activations(iq4), *shape) == (8, 128, 4, 2)
        with mock.patch.dict(CONFIGS, {("iq4_a8", *shape): (16, 64, 4, 2)}):
            assert config_for(quant.with_int8_activations(iq4), *shape) == (16, 64, 4, 2)
    assert config_for(quant.with_int8_activations(iq4), *shape) == DEFAULT_CONFIG


@pytest.mark.parametrize("fmt,group", [("fp8_e4m3", 32), ("int4", 64), ("int8", 64)])
def test_int8_activations_leave_other_weights(rng, fmt, group):
    qm = quant.quantize(_weights(rng, 16, 256), fmt, group)
    assert not quant.takes_int8_activations(qm)
    assert not quant.with_int8_activations(qm).int8_activations  # left as it is, multiplying floats


@pytest.mark.parametrize("choice,h_by_w13", [("int8", False), ("int4:32", False), ("int4:32", True)])
def test_tiny_model_with_int8_activations(tiny_dir, rng, choice, h_by_w13, monkeypatch, request):
    from pallas_kernels import gemv_quant as gq
    from yalm_jax.loading import load_model

    # With h_by_w13, w13's kernel rounds h for w2 and wo's the FFN's normed input for w13
    # (gemv_quant.rounds_output_for), as they do on Mistral-7B's rows.
    monkeypatch.setattr(gq, "MIN_INT8_OUT_PROGRAMS", 0 if h_by_w13 else gq.MIN_INT8_OUT_PROGRAMS)
    jax.clear_caches()  # a decode step traced by another case would not ask again
    request.addfinalizer(jax.clear_caches)

    plain = load_model(tiny_dir, quant=choice)
    lm = load_model(tiny_dir, quant=choice, int8_activations=True)
    leaves = jax.tree.leaves(lm.weights, is_leaf=quant.is_quantized)
    for w, p in zip(leaves, jax.tree.leaves(plain.weights, is_leaf=quant.is_quantized)):
        if quant.is_quantized(w):  # marked, its bytes regrouped into int32 words once, at load
            assert w.int8_activations and w.q.dtype == jnp.int32 and w.shape == p.shape
            np.testing.assert_array_equal(np.asarray(w.q_bytes()), np.asarray(p.q))
    assert any(quant.is_quantized(w) for w in leaves)
    tokens = rng.integers(0, lm.cfg.vocab_size, 12).tolist()
    ref_pre, _ = _logits(plain, tokens)
    pre, _ = _logits(lm, tokens)
    # Rounded, and only by about the int8 step: over 120 draws of this tiny random model's logits, up to 5.8%.
    assert 0 < _rel(pre, ref_pre) < 0.12
    # The pallas decode step (dp4a products, in the interpreter) computes what the xla path does. Rounding
    # is discontinuous: where a kernel's sums (their own order) land a value an ulp from XLA's, on a rounding
    # boundary, it may round the other way, which at this model's width moves the logits ~1% (a normed
    # input's integers are those of x * g, the same product on both paths, but the attention's output and h
    # come from sums; 2 of ~200 sequences measured). So most of several sequences must agree to float precision.
    agree = 0
    for _ in range(6):
        tokens = rng.integers(0, lm.cfg.vocab_size, 12).tolist()
        (_, dec), (_, dec_pallas) = _logits(lm, tokens), _logits(lm, tokens, backend="pallas")
        agree += _rel(dec_pallas, dec) < 1e-4
    assert agree >= 4


def test_int8_activations_need_integer_weights(tiny_dir):
    from yalm_jax.errors import UserError
    from yalm_jax.loading import load_model

    with pytest.raises(UserError, match="int8_activations"):
        load_model(tiny_dir, quant="none", int8_activations=True)
    # fp8 weights keep an int8 output matrix (quant._EDGE): that one alone takes int8 activations.
    lm = load_model(tiny_dir, quant="fp8", int8_activations=True)
    marked = [w for w in jax.tree.leaves(lm.weights, is_leaf=quant.is_quantized) if quant.is_quantized(w)]
    assert {(w.fmt, w.int8_activations) for w in marked} == {("fp8_e4m3", False), ("int8", True)}


@pytest.mark.parametrize("fmt,group,with_min", FORMATS, ids=FMT_IDS)
def test_xla_decode_product_matches_reference(rng, fmt, group, with_min):
    # quant.matmul's one-token form (multiply-then-sum, scales per group) and its chunk form.
    qm = jax.device_put(_quantize(_weights(rng, 64, 256), fmt, group, with_min))
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    dense = np.asarray(quant.dequantize(qm, jnp.float32))
    want = np.asarray(x) @ dense.T
    np.testing.assert_allclose(np.asarray(jax.jit(quant.matmul)(x[:1], qm)), want[:1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.jit(quant.matmul)(x, qm)), want, rtol=1e-4, atol=1e-4)


def test_int8_planes_hold_x_within_half_a_step_of_the_last(rng):
    # Each row of x as ACT_PLANES int8 planes under one scale a row, each plane rounding what those before it
    # left: x is held to half a step of the last plane, max|x| / (2 * 127 * 254^(planes - 1)), plus what f32's
    # rounding of the scales costs: 127 times an ulp of the first is about one such half step (XLA GPU's
    # reciprocals read 1.35 half steps; the CPU 1.0), so two.
    x = rng.standard_normal((5, 576)).astype(np.float32) * np.float32([[1e-3], [1.0], [40.0], [1.0], [7.0]])
    x[1, rng.integers(576)] *= 300  # an outlier
    x[3] = 0
    planes, scales = jax.jit(quant.int8_planes)(jnp.asarray(x))
    assert planes.dtype == jnp.int8 and planes.shape == (quant.ACT_PLANES, 5, 576)
    held = np.sum(np.asarray(planes, np.float64) * np.asarray(scales, np.float64), axis=0)
    half_step = np.abs(x).max(-1, keepdims=True) / (2 * 127 * 254 ** (quant.ACT_PLANES - 1))
    assert np.all(np.abs(held - x) <= 2 * half_step)
    assert not held[3].any()


@pytest.mark.skipif(ON_GPU, reason="the CPU's product; a GPU multiplies in its kernels or a float fusion")
@pytest.mark.parametrize("tokens", [1, 7])
def test_cpu_multiplies_int8_per_channel_as_integers(rng, tokens):
    # int8 with a scale a row times x's int8 planes, in XLA's int8 product: the dequantized matrix's product to
    # f32's precision of x (sum_k |W_nk| times 2^-23 of max|x|, which two planes' error exceeds).
    k = 576
    qm = jax.device_put(quant.quantize(_weights(rng, 96, k), "int8"))
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x[0, rng.integers(k)] = 25.0
    got = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x), qm), np.float64)
    dense = np.asarray(quant.dequantize(qm, jnp.float32), np.float64)
    want = x.astype(np.float64) @ dense.T
    f32_of_x = np.abs(x).max(-1, keepdims=True) * 2.0**-23
    assert np.all(np.abs(got - want) <= f32_of_x * np.abs(dense).sum(-1)[None] + 1e-6 * np.abs(want).max())
    # The integer product, not a float one (W's own int8 type is in any lowering; the product's operands are not).
    lowered = jax.jit(quant.matmul).lower(jnp.asarray(x), qm).as_text()
    assert re.search(r"dot_general.*xi8>, tensor<\w+xi8>\) -> tensor<\w+xi32>", lowered)


@pytest.mark.skipif(not ON_GPU, reason="a GPU keeps weights quantized in the graph; the CPU dequantizes at load")
def test_prefill_holds_one_dense_matrix_at_a_time(rng):
    # At Mistral-7B's width XLA computed every layer's dequantize ahead of the first layer, a dense copy of all
    # the layers' matrices in temporary memory (13.7 w13s' worth for these 8 layers), until quant.matmul tied
    # each to its product's input. (Narrower models never showed it.) The products' values:
    # test_xla_decode_product_matches_reference.
    from bench_gpu import make_cfg, quantized_weights, random_cache, random_weights

    from yalm_jax import generate

    cfg = dataclasses.replace(make_cfg("mistral7b", "bfloat16"), n_layers=8, vocab_size=1024)
    seed = int(rng.integers(1 << 30))
    weights = quantized_weights(random_weights(cfg, seed=seed), "int4", seed=seed)  # --quant=int4's forms
    progs = generate.Programs()
    logits, _ = generate.prefill(weights, random_cache(cfg, 1024), list(range(64)), 0, cfg, chunk=64,
                                 backend="pallas", programs=progs)  # fmt: skip
    assert bool(jnp.isfinite(logits).all())
    temp = sum(exe.memory_analysis().temp_size_in_bytes for exe in progs._exe.values())
    assert temp < 2 * (2 * cfg.hidden_dim * cfg.dim * 2)  # two dense bf16 w13s


# -- models ---------------------------------------------------------------------------------

# ||logits - dense|| / ||dense|| of the random tiny model (64 wide, random weights amplify every error;
# measured ~0.03 int8, ~0.15 fp8, ~0.2-0.6 e5m2, ~0.35 int4 with groups of 32). SmolLM2's perplexities
# in BENCHMARKS.md are the quality figures; here the quantized model must also compute exactly the
# dense model with the dequantized weights.
MODEL_TOL = {"int8": 0.08, "fp8": 0.3, "fp8_e5m2": 1.0, "int4": 0.7}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import make_tiny_chat_model

    return make_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_quant")), "llama")


def _logits(lm, tokens, backend="xla", kv_dtype=None):
    """Prefill all but the last token, then one decode step: (prefill logits, decode logits)."""
    cache = model.init_cache(lm.cfg, 32, kv_dtype)
    t = jnp.asarray(tokens, jnp.int32)
    pre, cache = model.forward(lm.weights, cache, t[:-1], jnp.arange(len(tokens) - 1, dtype=jnp.int32), cfg=lm.cfg)
    dec, _ = model.forward(
        lm.weights, cache, t[-1:], jnp.asarray([len(tokens) - 1], jnp.int32), cfg=lm.cfg, backend=backend
    )
    return np.asarray(pre), np.asarray(dec)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("choice", ["int8", "fp8", "fp8_e5m2", "int4:32"])
def test_tiny_model_quantized_at_load_is_close_to_dense(tiny_dir, rng, choice):
    from yalm_jax.loading import load_model

    dense = load_model(tiny_dir)
    lm = load_model(tiny_dir, quant=choice)
    assert isinstance(lm.weights.layers[0].w13, quant.QuantizedMatrix)
    assert lm.weights.nbytes() < dense.weights.nbytes() / 2.5
    tokens = rng.integers(0, dense.cfg.vocab_size, 12).tolist()
    ref_pre, _ = _logits(dense, tokens)
    pre, dec = _logits(lm, tokens)
    # Against the dense model, over the 11 prefill positions: one decode position of a random tiny model
    # is too chaotic to bound (int4: median 0.35, but 1.4 for one draw in CI). The decode step is checked
    # exactly below, against the dequantized weights and across backends.
    assert _rel(pre, ref_pre) < MODEL_TOL[choice.split(":")[0]]
    same = dataclasses.replace(dense, weights=jax.tree_util.tree_map(
        lambda w: w.dequantize() if quant.is_quantized(w) else w, lm.weights, is_leaf=quant.is_quantized
    ))  # fmt: skip
    sim_pre, sim_dec = _logits(same, tokens)
    assert _rel(pre, sim_pre) < 1e-4 and _rel(dec, sim_dec) < 1e-4
    # The pallas decode path (kernels in the interpreter) computes what the xla path does.
    _, dec_pallas = _logits(lm, tokens, backend="pallas")
    assert _rel(dec_pallas, dec) < 1e-4


def test_smollm2_native_blocks_compute_the_dense_model(smollm2_gguf):
    from yalm_jax.loading import load_model

    dense = load_model(smollm2_gguf, quant="none")
    lm = load_model(smollm2_gguf, quant="native")
    w = lm.weights
    assert all(isinstance(x, quant.QuantizedMatrix) for x in (w.embed, w.layers[0].wqkv, w.layers[0].w13, w.layers[0].w2))
    assert w.nbytes() < dense.weights.nbytes() / 5
    tokens = dense.tokenizer.encode("The history of the printing press begins")
    ref_pre, ref_dec = _logits(dense, tokens)
    pre, dec = _logits(lm, tokens)
    assert _rel(pre, ref_pre) < 1e-5 and _rel(dec, ref_dec) < 1e-5


def test_cpu_default_dequantizes_at_load_all_but_int8_per_channel(tiny_dir, monkeypatch):
    # The CPU multiplies int8 with a scale a row as integers (faster than dense f32), every other form dense.
    from yalm_jax.loading import load_model

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", True)
    assert quant.is_quantized(load_model(tiny_dir, quant="int8").weights.layers[0].wo)
    assert isinstance(load_model(tiny_dir, quant="int4:32").weights.layers[0].wo, jax.Array) == (not ON_GPU)


def test_a_gguf_keeps_its_blocks_by_default_where_weights_stay_quantized(smollm2_gguf, tiny_dir, monkeypatch):
    # On the CPU, which computes with weights dequantized at load, a GGUF file loads through gguf's own
    # dequantization; where weights stay quantized (a GPU; on the CPU DEQUANTIZE_ON_CPU off) its blocks stay as
    # stored, the Q4_1 matrices as int4 with mins. A dense checkpoint loads dense either way.
    from yalm_jax.loading import load_model

    for keeps in (False, True):
        monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", not keeps)
        w13 = load_model(smollm2_gguf).weights.layers[0].w13
        if keeps or ON_GPU:
            assert quant.is_quantized(w13) and (w13.fmt, w13.group, w13.min is not None) == ("int4", 32, True)
        else:
            assert isinstance(w13, jax.Array) and w13.dtype == jnp.float32
        assert isinstance(load_model(tiny_dir).weights.layers[0].w13, jax.Array)


@pytest.mark.parametrize("choice", ["int4:32", "fp8"])
def test_quantize_script_round_trip(tiny_dir, tmp_path, choice):
    from yalm_jax.loading import load_model

    out = str(tmp_path / "q")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "quantize.py"), f"--model={tiny_dir}", f"--out={out}", f"--quant={choice}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    section = json.load(open(os.path.join(out, "config.json")))["quantization"]
    assert section["quant"] == choice and "model.layers.0.mlp.up_proj.weight" in section["tensors"]
    assert section["tensors"]["model.layers.0.mlp.up_proj.weight"]["group"] == 32
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    back = load_model(out)  # a quantized checkpoint loads as stored
    direct = load_model(tiny_dir, quant=choice)
    a, b = jax.tree_util.tree_flatten(back.weights), jax.tree_util.tree_flatten(direct.weights)
    assert a[1] == b[1]
    for x, y in zip(a[0], b[0]):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert back.tokenizer.encode("Hello there") == direct.tokenizer.encode("Hello there")


# -- what a model takes on the device, before loading it (parallel.check_fits) ----------------


def _estimate(path: str, dtype: str, choice: str) -> int:
    from yalm_jax.loading import gguf, hf
    from yalm_jax.weights import field_nbytes

    cfg, source, _ = (gguf.open_gguf if path.endswith(".gguf") else hf.open_hf_dir)(path, dtype)
    return sum(n for _, n in field_nbytes(cfg, source, choice))


@pytest.mark.parametrize("choice", ["none", "int8", "int4:32", "int4:128", "fp8", "native"])
@pytest.mark.parametrize("dequantize_on_cpu", [False, True], ids=["kept", "cpu_default"])
def test_weights_bytes_estimate_is_what_loading_places(tiny_dir, choice, dequantize_on_cpu, monkeypatch):
    from yalm_jax.loading import load_model

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", dequantize_on_cpu)

    placed = load_model(tiny_dir, dtype="bfloat16", quant=choice).weights.nbytes()
    assert _estimate(tiny_dir, "bfloat16", choice) == placed


def test_weights_bytes_estimate_of_stored_blocks(smollm2_gguf, tiny_dir, tmp_path, monkeypatch):
    from yalm_jax.loading import load_model

    # GGUF Q4_1 / Q8_0 blocks kept as they are, the rest dequantized.
    assert _estimate(smollm2_gguf, "bfloat16", "native") == load_model(smollm2_gguf, "bfloat16", quant="native").weights.nbytes()
    for choice in ("int4", "int8"):  # quantized checkpoints, which load as they are stored
        out = str(tmp_path / choice)
        subprocess.run(
            [sys.executable, os.path.join(REPO, "scripts", "quantize.py"), f"--model={tiny_dir}", f"--out={out}",
             f"--quant={choice}"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        assert _estimate(out, "float32", "native") == load_model(out).weights.nbytes()
        # The CPU's default: int8 with a scale a row stays int8, int4 loads dense.
        monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", True)
        assert _estimate(out, "float32", "native") == load_model(out).weights.nbytes()
        monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)


def test_a_quantized_model_fits_where_its_dense_form_does_not(tiny_dir):
    from yalm_jax import parallel
    from yalm_jax.errors import UserError
    from yalm_jax.loading import hf
    from yalm_jax.weights import field_nbytes

    cfg, source, _ = hf.open_hf_dir(tiny_dir, "bfloat16")
    dense, int4 = (field_nbytes(cfg, source, c) for c in ("none", "int4:32"))
    limit = (sum(n for _, n in dense) + sum(n for _, n in int4)) // 2
    parallel.check_fits(cfg, int4, limit=limit)
    with pytest.raises(UserError, match="--tp"):
        parallel.check_fits(cfg, dense, limit=limit)


def test_a_gguf_too_large_dense_is_pointed_at_its_blocks(smollm2_gguf, monkeypatch):
    # SmolLM2's Q4_1 file loaded dense (--quant=none); on a device that holds its blocks but not its dense form the
    # error names --quant=native (and its size) before --tp; where neither fits, only --tp.
    from yalm_jax import parallel
    from yalm_jax.errors import UserError
    from yalm_jax.loading import gguf, load_model
    from yalm_jax.weights import field_nbytes

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)  # the forms a GPU loads
    cfg, source, _ = gguf.open_gguf(smollm2_gguf, "bfloat16")
    dense, native = (field_nbytes(cfg, source, c) for c in ("none", "native"))
    need = sum(n for _, n in native)
    assert need < sum(n for _, n in dense) / 2
    with pytest.raises(UserError, match=rf"--quant=native loads it in {need / 1e9:.1f} GB per device, or"):
        parallel.check_fits(cfg, dense, limit=need + 1, alternatives=[("--quant=native", lambda: native)])
    with pytest.raises(UserError) as e:
        parallel.check_fits(cfg, dense, limit=need - 1, alternatives=[("--quant=native", lambda: native)])
    assert "--quant=native" not in str(e.value) and "--tp" in str(e.value)
    # load_model offers the blocks where it loads the file dense, and nothing else where it keeps them.
    seen = []
    monkeypatch.setattr(parallel, "check_fits", lambda cfg, f, alternatives=(): seen.append(alternatives))
    load_model(smollm2_gguf, "bfloat16", quant="none")
    load_model(smollm2_gguf, "bfloat16", quant="native")
    assert [[flag for flag, _ in alt] for alt in seen] == [["--quant=native"], []]


# -- KV cache dtype -------------------------------------------------------------------------


def test_fp8_kv_cache_through_both_paths(tiny_dir, rng):
    from yalm_jax.loading import load_model

    lm = load_model(tiny_dir)
    tokens = rng.integers(0, lm.cfg.vocab_size, 12).tolist()
    ref_pre, ref_dec = _logits(lm, tokens)
    for kv in ("bfloat16", "float16", "float8_e4m3fn"):
        pre, dec = _logits(lm, tokens, kv_dtype=kv)
        _, dec_pallas = _logits(lm, tokens, backend="pallas", kv_dtype=kv)
        # e4m3 keeps 3 mantissa bits (up to 6% per stored value); over 60 token draws the decode logits
        # landed 0.08 from f32 at the median, 0.23 at worst (0.2 was the bound until a CI draw hit 0.21),
        # and a misread cache lands near 1. bf16's 8 bits: over ~600 draws median 0.0055, worst 0.029 (0.02 was
        # the bound until a CI draw hit 0.0215); f16: worst 0.0018.
        tol = {"bfloat16": 0.06, "float16": 0.02, "float8_e4m3fn": 0.35}[kv]
        assert _rel(pre, ref_pre) < tol and _rel(dec, ref_dec) < tol, kv
        # Both paths attend over keys and values as the cache stores them, with the f32 query exact: the
        # kernels in bf16 terms (attention_operands), the xla path in f32 (ops.attention_dtype).
        assert _rel(dec_pallas, dec) < 1e-3, kv


def test_xla_attention_multiplies_an_f32_query_in_f32(monkeypatch):
    """On a GPU the xla path multiplies 16-bit queries in the cache's 16-bit dtype, and an f32 one in f32 (not
    rounded to the cache's dtype); the CPU always in f32."""
    assert ops.attention_dtype(jnp.float32, jnp.bfloat16) == jnp.float32
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.attention_dtype(jnp.float32, jnp.bfloat16) == jnp.float32
    assert ops.attention_dtype(jnp.float32, jnp.float8_e4m3fn) == jnp.float32
    assert ops.attention_dtype(jnp.bfloat16, jnp.bfloat16) == jnp.bfloat16
    assert ops.attention_dtype(jnp.bfloat16, jnp.float8_e4m3fn) == jnp.bfloat16
    assert ops.attention_dtype(jnp.float16, jnp.float16) == jnp.float16


def test_decode_attention_kernel_reads_and_writes_an_fp8_cache(rng):
    n_heads, n_kv, t, hd, pos = 8, 2, 64, 32, 40
    q = jnp.asarray(rng.standard_normal((n_heads, hd)), jnp.float32)
    kn, vn = (jnp.asarray(rng.standard_normal((n_kv, hd)), jnp.float32) for _ in range(2))
    kc, vc = (jnp.asarray(rng.standard_normal((n_kv, t, hd)), jnp.float8_e4m3fn) for _ in range(2))
    qkv = jnp.concatenate([q, kn, vn])
    out, kc2, vc2, _ = decode_attention_update(
        qkv, kc, vc, pos, n_heads=n_heads, config=(16, 32, 4, 2), interpret=INTERPRET
    )
    assert kc2.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(kc2[:, pos], np.float32), np.asarray(kn.astype(jnp.float8_e4m3fn), np.float32))
    ref = decode_attention_reference(q, kc2, vc2, pos + 1)
    # The new token enters the output as the fp8 cache stores it, as the reference reads it back.
    assert _rel(np.asarray(out), np.asarray(ref)) < 1e-5


def test_generator_keeps_its_cache_in_kv_dtype(tiny_dir):
    from yalm_jax.generate import Generator
    from yalm_jax.loading import load_model

    lm = load_model(tiny_dir)
    g = Generator(lm.weights, lm.cfg, lm.tokenizer, max_context=64, kv_dtype="float8_e4m3fn")
    out = g.generate(lm.tokenizer.encode("Once upon a time"), max_new_tokens=4)
    assert len(out.token_ids) >= 1 and g.cache.k[0].dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("choice", ["int8", "int4", "fp8"])
def test_bench_rows_time_the_loaders_forms(rng, monkeypatch, choice):
    # bench_gpu's quant part times random weights in each --quant choice's form; it must be the form load_field
    # makes of each field (int4 with mins, the embedding and output matrix int8), or its figures time another.
    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
    from bench_gpu import random_quantized, row_form

    w = _weights(rng, 64, 256)
    for field in ("wqkv", "w2", "lm_head", "embed"):
        loaded = quant.load_field(choice, field, ["w"], None, lambda name: w, "bfloat16")
        form = row_form(choice, field, 256)
        mins = None if loaded.min is None else loaded.min.dtype.name
        assert form == (loaded.fmt, None if loaded.group == 256 else loaded.group, mins), field
        drawn = random_quantized((64, 256), form, seed=0)
        arrays = lambda m: [(a.shape, a.dtype) for a in (m.q, m.scale, m.min) if a is not None]  # noqa: E731
        assert arrays(drawn) == arrays(loaded), field
