"""The Pallas kernels lower for the GPU from any machine, at the real models' shapes, and a decode step
launches exactly the kernels we count.

Lowering for CUDA runs the whole Pallas-to-Triton translation on the host; only the PTX compile needs
the card. So CI catches what the GPU would reject while tracing (a load modifier the Triton lowering
does not take once reached the card that way) for every kernel form and weight format, without
device time. And since at batch 1 a small model's step time is set by how many kernels it runs, the
step's Triton kernels are counted: a change that sends a projection or the attention off its kernel
(to XLA's slower, many-kernel path) fails here.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as attn
from pallas_kernels import gemv, gemv_mosaic, gemv_pair_mosaic, gemv_quant, gemv_s8_mosaic
from pallas_kernels import prefill_attention as prefill
from yalm_jax import model, ops, quant
from yalm_jax.config import ModelConfig
from yalm_jax.weights import LayerWeights, Weights

SDS = jax.ShapeDtypeStruct
# The card a lowering targets where no GPU is visible: jax 0.11's Triton lowering takes it from the abstract mesh's
# device and refuses without one (jax 0.10 assumed an sm_90 card). The card the kernels are tuned on.
LOWERING_MESH = jax.sharding.AbstractMesh(
    (1,), ("lowering",), axis_types=(jax.sharding.AxisType.Auto,),  # jax 0.11's default, Explicit, types shardings
    abstract_device=jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"),
)  # fmt: skip


def gpu_lowering(fn, *args, own_mesh: bool = False) -> str:
    """`fn(*args)` lowered for the GPU (StableHLO text), on any machine. `own_mesh`: `fn` shards over a mesh of its
    own, which a context mesh would have to match, so none names the card: where no GPU is visible that lowers
    only under jax 0.10."""

    def lower():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    if own_mesh:
        return lower()
    with jax.sharding.use_abstract_mesh(LOWERING_MESH):
        return lower()


def triton_kernels(fn, *args, own_mesh: bool = False) -> list[str]:
    """The names of the Triton kernels `fn(*args)` launches on the GPU, in program order (lowered, not run)."""
    lines = gpu_lowering(fn, *args, own_mesh=own_mesh).splitlines()
    return [re.findall(r'name = "([^"]+)"', line)[-1] for line in lines if "xla.gpu.triton" in line]


@pytest.fixture
def compiled_kernels(monkeypatch):
    # On this CPU ops sends the kernels to Pallas' interpreter; lowering for the GPU needs them compiled.
    monkeypatch.setattr(ops, "_interpret", lambda: False)


def quantized(n: int, k: int, fmt: str, dtype: str, with_min: bool | str = False) -> quant.QuantizedMatrix:
    """An abstract (n, k) QuantizedMatrix in `fmt`, its parts' dtypes and widths taken from a real one;
    with_min True: quantize's mins (int4's zero points), "f16": f16 mins (GGUF's Q4_1 form).
    "int8_g32" with a min is GGUF's Q5_K form (int8 in groups of 32 with an f16 min a group), "iq4" its IQ4_NL
    and IQ4_XS form (int4's layout held as int32 words, levels for codes, f16 scales in groups of 32): only
    GGUF blocks make them."""
    if fmt == "iq4":
        return quant.QuantizedMatrix(SDS((n, k // 8), jnp.int32), SDS((n, k // 32), jnp.float16), None, "iq4", 32, dtype)
    name, group = ("int8", 32) if fmt == "int8_g32" else quant.parse_choice(fmt)
    fmt = {"fp8": "fp8_e4m3"}.get(name, name)
    probe = quant.quantize(np.random.default_rng().standard_normal((2, k)), fmt, group, with_min=bool(with_min))
    part = lambda a: None if a is None else SDS((n, a.shape[1]), a.dtype)  # noqa: E731
    mn = probe.scale if with_min == "f16" or (with_min and probe.min is None) else probe.min
    return quant.QuantizedMatrix(part(probe.q), part(probe.scale), part(mn), probe.fmt, probe.group, dtype)


def abstract_weights(cfg: ModelConfig, fmt: str | None = None) -> Weights:
    """The weights pytree of `cfg` as shapes; with `fmt`, the matrices the GEMV kernels read are quantized."""
    dt = cfg.dtype

    def matrix(n, k):
        return SDS((n, k), dt) if fmt is None else quantized(n, k, fmt, dt)

    def vec(n, present=True):
        return SDS((n,), dt) if present else None

    layer = LayerWeights(
        attn_norm=vec(cfg.dim), wqkv=matrix(cfg.q_dim + 2 * cfg.kv_dim, cfg.dim),
        bqkv=vec(cfg.q_dim + 2 * cfg.kv_dim, cfg.qkv_bias), wo=matrix(cfg.dim, cfg.q_dim), ffn_norm=vec(cfg.dim),
        w13=matrix(2 * cfg.hidden_dim, cfg.dim), w2=matrix(cfg.dim, cfg.hidden_dim),
        q_norm=vec(cfg.head_dim, cfg.qk_norm), k_norm=vec(cfg.head_dim, cfg.qk_norm),
        attn_post_norm=vec(cfg.dim, cfg.post_norms), ffn_post_norm=vec(cfg.dim, cfg.post_norms),
    )  # fmt: skip
    return Weights(
        embed=SDS((cfg.vocab_size, cfg.dim), dt), layers=[layer] * cfg.n_layers, final_norm=vec(cfg.dim),
        lm_head=None if cfg.tie_embeddings else matrix(cfg.vocab_size, cfg.dim),
    )  # fmt: skip


# Real models' layer shapes, two layers each (the count is per layer).
MODELS = {
    "smollm2": dict(arch="llama", dim=576, hidden_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, tie_embeddings=True),
    "mistral7b": dict(arch="llama", dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, head_dim=128,
                      vocab_size=32000),
    "qwen2_0.5b": dict(arch="qwen2", dim=896, hidden_dim=4864, n_heads=14, n_kv_heads=2, head_dim=64,
                       vocab_size=151936, qkv_bias=True, tie_embeddings=True),
    "qwen3_0.6b": dict(arch="qwen3", dim=1024, hidden_dim=3072, n_heads=16, n_kv_heads=8, head_dim=128,
                       vocab_size=151936, qk_norm=True, tie_embeddings=True),
    "gemma3_270m": dict(arch="gemma3", dim=640, hidden_dim=2048, n_heads=4, n_kv_heads=1, head_dim=256,
                        vocab_size=262144, qk_norm=True, post_norms=True, activation="gelu_tanh",
                        norm_weight_offset=1.0, embed_scale=640**0.5, attn_scale=256**-0.5, tie_embeddings=True,
                        sliding_window=512, sliding_layers=(True, False)),
}  # fmt: skip


def make_cfg(name: str, dtype: str) -> ModelConfig:
    return ModelConfig(n_layers=2, norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192, dtype=dtype,
                       **MODELS[name])  # fmt: skip


def decode_step_kernels(cfg: ModelConfig, fmt: str | None = None, kv_dtype: str | None = None,
                        int8_activations: bool = False) -> list[str]:  # fmt: skip
    weights = abstract_weights(cfg, fmt)
    weights = jax.eval_shape(quant.with_int8_activations, weights) if int8_activations else weights
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 4096, kv_dtype))
    token, pos = SDS((1,), jnp.int32), SDS((1,), jnp.int32)
    return triton_kernels(lambda w, c, t, p: model.forward(w, c, t, p, cfg=cfg, backend="pallas"),
                          weights, cache, token, pos)  # fmt: skip


def expected_step(cfg: ModelConfig, gemv_kind: str = "gemv") -> list[str]:
    """Five kernels a layer (the norm, rope, residual, KV write and split merge all inside them) and the output."""
    layer = [
        f"{gemv_kind}_{cfg.q_dim + 2 * cfg.kv_dim}x{cfg.dim}_", "decode_attention",
        f"{gemv_kind}_{cfg.dim}x{cfg.q_dim}_", f"{gemv_kind}_gated_{cfg.hidden_dim}x{cfg.dim}_",
        f"{gemv_kind}_{cfg.dim}x{cfg.hidden_dim}_",
    ]  # fmt: skip
    return layer * cfg.n_layers + [f"{gemv_kind}_{cfg.vocab_size}x{cfg.dim}_"]


def assert_kernels(got: list[str], want_prefixes: list[str]) -> None:
    assert len(got) == len(want_prefixes), f"{len(got)} Triton kernels a step, expected {len(want_prefixes)}: {got}"
    for name, prefix in zip(got, want_prefixes):
        assert name.startswith(prefix), f"kernel {name!r} where {prefix!r}... was expected, in {got}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decode_step_is_five_kernels_a_layer(compiled_kernels, name, dtype):
    cfg = make_cfg(name, dtype)
    assert_kernels(decode_step_kernels(cfg), expected_step(cfg))


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "fp8_e5m2"])
def test_quantized_decode_step_dequantizes_in_the_kernels(compiled_kernels, fmt):
    cfg = make_cfg("mistral7b", "bfloat16")
    kind = {"fp8": "gemv_fp8_e4m3"}.get(fmt, f"gemv_{fmt}")
    assert_kernels(decode_step_kernels(cfg, fmt, kv_dtype="float8_e4m3fn"), expected_step(cfg, kind))


@pytest.mark.parametrize("name", [m for m in MODELS if m != "mistral7b"])
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_small_models_quantized_decode_step(compiled_kernels, name, fmt):
    # Their rows (576, 640, 896, 1024 ... columns) end in a masked chunk in every quantized kernel.
    cfg = make_cfg(name, "bfloat16")
    kind = {"fp8": "gemv_fp8_e4m3"}.get(fmt, f"gemv_{fmt}")
    want = expected_step(cfg, kind)
    if cfg.tie_embeddings:  # the output matrix is the embedding, left dense by abstract_weights
        want[-1] = f"gemv_{cfg.vocab_size}x{cfg.dim}_"
    assert_kernels(decode_step_kernels(cfg, fmt), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_activation_decode_step(compiled_kernels, fmt):
    cfg = make_cfg("mistral7b", "bfloat16")
    names = decode_step_kernels(cfg, fmt, int8_activations=True)
    assert_kernels(names, expected_step(cfg, f"gemv_{fmt}_a8"))
    # int4's w13 rounds h as it writes it, for w2 (ops.gated_ffn_up), and wo the FFN's normed input, for w13
    # (ops.linear_for_next): their programs hold whole blocks of 32.
    rounding = [n for n in names if "_gated_" in n or "_4096x4096_" in n]
    assert len(rounding) == 2 * cfg.n_layers
    assert all(n.split("_")[-1].startswith("32x") for n in rounding) == (fmt == "int4")


@pytest.mark.parametrize("fmt,with_min", [("int8", False), ("int4", False), ("int4", True), ("int4", "f16")])
def test_int8_vector_gemv_forms_lower(fmt, with_min):
    # wo writing its result and that result normed and rounded (int8_out, norm_out); w13 reading it, gated,
    # writing h rounded; w2 reading h.
    def a8(w):
        return dataclasses.replace(w, q=SDS((w.q.shape[0], w.q.shape[1] // 4), jnp.int32), int8_activations=True)

    shapes = ((4096, 4096), (28672, 4096), (4096, 14336))
    wo, w13, w2 = (a8(quantized(n, k, fmt, "bfloat16", with_min)) for n, k in shapes)

    def run(wo, w13, w2, a, g, r):
        x, xv = gemv_quant.gemv_quant(wo, a, residual=r, int8_out=True, norm_out=(g, 1e-5))
        _, h = gemv_quant.gemv_quant(w13, xv, gated=True, int8_out=True)
        return gemv_quant.gemv_quant(w2, h, residual=x)

    vec = SDS((4096,), jnp.bfloat16)
    names = triton_kernels(run, wo, w13, w2, vec, vec, vec)
    assert len(names) == 3
    assert names[0].startswith(f"gemv_{fmt}_a8_4096x4096_32x")
    assert names[1].startswith(f"gemv_{fmt}_a8_gated_14336x4096_") and names[2].startswith(f"gemv_{fmt}_a8_4096x14336_")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "n,k,form",
    [(6144, 4096, dict(norm=True)), (28672, 4096, dict(gated=True, norm=True)), (4096, 14336, dict(residual=True)),
     (3072, 576, dict(gated=True, norm=True, activation="gelu_tanh")), (1152, 896, dict(bias=True)),
     (32000, 4096, {})],
)  # fmt: skip
def test_gemv_forms_lower(dtype, n, k, form):
    form = dict(form)
    n_out = n // 2 if form.get("gated") else n
    extra = {field: SDS((n_out,), dtype) for field in ("bias", "residual") if form.pop(field, False)}
    norm = SDS((k,), dtype) if form.pop("norm", False) else None

    def run(w, x, g, extra):
        return gemv.gemv(w, x, norm=None if g is None else (g, 1e-5), **extra, **form)

    names = triton_kernels(run, SDS((n, k), dtype), SDS((k,), dtype), norm, extra)
    assert len(names) == 1 and names[0].startswith(f"gemv{'_gated' if form.get('gated') else ''}_{n_out}x{k}_")


@pytest.mark.parametrize("fmt,with_min", [("int8", False), ("int4", False), ("int4", True), ("int4", "f16"),
                                          ("int4:128", False), ("int8_g32", True), ("fp8", False),
                                          ("fp8_e5m2", False)])  # fmt: skip
@pytest.mark.parametrize("n,k,form", [(6144, 4096, dict(norm=True)), (28672, 4096, dict(gated=True, norm=True)),
                                      (4096, 14336, dict(residual=True)), (3072, 576, dict(gated=True, norm=True)),
                                      (576, 1536, dict(residual=True))])  # fmt: skip
def test_quantized_gemv_forms_lower(fmt, with_min, n, k, form):
    # Mistral-7B's rows and SmolLM2's (whose last chunk is masked: every format's load takes a mask).
    w = quantized(n, k, fmt, "bfloat16", with_min)
    n_out = n // 2 if form.get("gated") else n
    norm = SDS((k,), jnp.bfloat16) if form.get("norm") else None
    residual = SDS((n_out,), jnp.bfloat16) if form.get("residual") else None
    gated = form.get("gated", False)

    def run(w, x, g, r):
        return gemv_quant.gemv_quant(w, x, norm=None if g is None else (g, 1e-5), residual=r, gated=gated)

    args = (w, SDS((k,), jnp.bfloat16), norm, residual)
    names = triton_kernels(run, *args)
    assert len(names) == 1 and names[0].startswith(f"gemv_{w.fmt}{'_gated' if gated else ''}_{n_out}x{k}_")
    if w.fmt == "int4" or w.group == k:  # the products that accumulate go through PTX's fma
        assert "fma.rn.f32" in gpu_lowering(run, *args)


@pytest.mark.parametrize("fmt,with_min", [("int8", False), ("int4", False), ("int4", True), ("int4", "f16"),
                                          ("int8_g32", True), ("iq4", False)])  # fmt: skip
@pytest.mark.parametrize("n,k,form", [(6144, 4096, {}), (28672, 4096, dict(gated=True)),
                                      (4096, 14336, dict(residual=True))])  # fmt: skip
def test_int8_activation_gemv_forms_lower(fmt, with_min, n, k, form):
    # As with_int8_activations leaves it: q's bytes as int32 words (iq4's are already).
    w = quantized(n, k, fmt, "bfloat16", with_min)
    words = w.q if w.q.dtype == jnp.int32 else SDS((n, w.q.shape[1] // 4), jnp.int32)
    w = dataclasses.replace(w, q=words, int8_activations=True)
    n_out = n // 2 if form.get("gated") else n
    residual = SDS((n_out,), jnp.bfloat16) if form.get("residual") else None
    norm = None if form.get("residual") else SDS((k,), jnp.bfloat16)

    def run(w, x, g, r):
        return gemv_quant.gemv_quant(w, x, norm=None if g is None else (g, 1e-5), residual=r,
                                     gated=form.get("gated", False))  # fmt: skip

    args = (w, SDS((k,), jnp.bfloat16), norm, residual)
    names = triton_kernels(run, *args)
    assert len(names) == 1 and names[0].startswith(f"gemv_{w.fmt}_a8{'_gated' if form.get('gated') else ''}_{n_out}x{k}_")
    # Four products an instruction: int8 weights are signed bytes, int4's unpacked nibbles unsigned ones;
    # x rounded in the kernel (the add of _round_ptx); and no step regroups the weights' bytes (a
    # bitcast-convert to wider words would copy them every token) or rounds x outside the kernel.
    text = gpu_lowering(run, *args)
    assert f"dp4a.{'u32' if w.fmt == 'int4' else 's32'}.s32" in text and "add.rn.f32" in text
    assert "bitcast_convert" not in text
    assert ("prmt.b32" in text) == (w.fmt == "iq4")  # iq4's levels looked up four at a time


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn])
@pytest.mark.parametrize("qk_norm,window", [(False, None), (True, 1024)])
def test_decode_attention_lowers(cache_dtype, qk_norm, window):
    n_heads, n_kv, hd, t = 32, 8, 128, 8192
    compute = jnp.float32 if cache_dtype == jnp.float32 else jnp.bfloat16
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    norm = (SDS((hd,), compute), SDS((hd,), compute)) if qk_norm else None
    cache = SDS((n_kv, t, hd), cache_dtype)

    def step(qkv, k, v, pos, norm):
        return attn.decode_attention_update(qkv, k, v, pos, n_heads=n_heads, rope_inv_freq=inv_freq,
                                            qk_norm=None if norm is None else (*norm, 1e-6), window=window)  # fmt: skip

    qkv = SDS((n_heads + 2 * n_kv, hd), compute)
    assert triton_kernels(step, qkv, cache, cache, SDS((), jnp.int32), norm) == ["decode_attention"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_prefill_attention_lowers(dtype):
    s, n_heads, n_kv, hd, t = 512, 32, 8, 128, 4096
    q, cache = SDS((s, n_heads, hd), dtype), SDS((n_kv, t, hd), dtype)
    names = triton_kernels(lambda q, k, v, start: prefill.prefill_attention(q, k, v, start), q, cache, cache,
                           SDS((), jnp.int32))  # fmt: skip
    assert names == ["prefill_attention"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (14336, 4096), (4096, 14336), (32000, 4096), (960, 576)])
def test_mosaic_gemv_lowers(dtype, n, k):
    """The Mosaic GPU GEMV that scripts/gpu_check.py times against the Triton one (its default tile, or 64 x 64
    where K = 576 takes no 128-wide chunks) lowers: TMA copies, swizzled tiles and register layouts accepted."""
    config = None if k % 128 == 0 else (64, 64, 8)
    text = gpu_lowering(lambda w, x: gemv_mosaic.gemv_mosaic(w, x, config=config), SDS((n, k), dtype), SDS((k,), dtype))
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("n,k,splits", [(4096, 4096, 2), (28672, 4096, 1), (4096, 14336, 2)])
def test_mosaic_s8_gemvs_lower(n, k, splits):
    """The tensor-core GEMVs that gpu_check.py times against the dp4a ones lower: s8 WGMMAs into s32
    accumulators, int8 weights from swizzled shared memory, int4's nibbles from registers."""
    x = SDS((k,), jnp.int8), SDS((k // 32,), jnp.float32)
    int8 = gemv_s8_mosaic.gemv_s8_mosaic, SDS((n, k), jnp.int8), SDS((n,), jnp.float32)
    int4 = gemv_s8_mosaic.gemv_s4_mosaic, SDS((n, k // 2), jnp.int8), SDS((n, k // 32), jnp.float16)
    for kernel, *weights in (int8, int4):
        text = gpu_lowering(functools.partial(kernel, splits=splits), *weights, *x)
        assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("pairs,hidden,dim", [(8, 8192, 4096), (1, 1024, 1024)])
def test_mosaic_pair_chain_lowers(pairs, hidden, dim):
    """The persistent GEMV-pair kernel lowers (grid-barrier semaphores, TMA reduce-adds) as one kernel for the
    whole chain, and refuses a grid that could not be resident at once."""
    w = jax.eval_shape(gemv_pair_mosaic.arrange_pairs, SDS((pairs, hidden, dim), jnp.bfloat16),
                       SDS((pairs, dim, hidden), jnp.bfloat16))  # fmt: skip
    text = gpu_lowering(gemv_pair_mosaic.gemv_pair_chain, w, SDS((dim,), jnp.float32))
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
    with pytest.raises(ValueError, match="resident"):
        gemv_pair_mosaic.check_shapes(64 * (gemv_pair_mosaic.MAX_CTAS + 1), dim)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_f32_model_asks_for_f32_products(dtype):
    """Under jax's default precision XLA:GPU would run an f32 model's products as TF32: the model marks each of
    its products HIGHEST itself when it computes in f32 (model.f32_products), and leaves bf16 ones alone."""
    cfg = make_cfg("smollm2", dtype)
    cache = jax.eval_shape(lambda: model.init_cache(cfg, 256))
    tokens, pos = SDS((16,), jnp.int32), SDS((16,), jnp.int32)
    with jax.default_matmul_precision("default"):
        text = gpu_lowering(lambda w, c, t, p: model.forward(w, c, t, p, cfg=cfg, backend="xla"),
                            abstract_weights(cfg), cache, tokens, pos)  # fmt: skip
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    highest = [line for line in dots if "precision = [HIGHEST, HIGHEST]" in line]
    assert len(dots) >= 4 * cfg.n_layers + 1  # wqkv, wo, w13, w2 a layer, the output, and the attention's
    assert len(highest) == (len(dots) if dtype == "float32" else 0)
