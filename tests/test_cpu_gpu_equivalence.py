"""The same model and prompt on the CPU (f32, xla) and on the GPU (f32 and bf16), in one process.

Skips where jax has no GPU. On a GPU machine, from the repository root:

    PYTHONPATH=. python -m pytest -q tests/test_cpu_gpu_equivalence.py

The model is a random Llama written with transformers' save_pretrained and
loaded through the HF loader: 4 layers, dim 256, 8 query / 2 kv heads of 32,
vocab 512, a 600-token prompt (five prefill chunks, the last one padded) and
64 decode steps, so the decode attention spans two of the kernel's sequence
splits. Weights are normal with 1/sqrt(fan_in) scales, so activations stay O(1).

What is compared, as ||gpu - cpu|| / ||cpu|| over f32 logits:
* the prompt's last logits (prefill: XLA matrix products on either backend);
* teacher-forced decode logits: the CPU's 64 greedy tokens fed one at a time
  through the decode path (Pallas kernels on the pallas backend), every step;
* greedy tokens of `generate.decode_chunk`, 64 steps on the device.

Tolerances, and what one H100 80GB HBM3 gave (jax 0.11.2, 2026-11-25):
* f32, GPU vs CPU (xla), under jax's default matmul precision: F32_TOL = 1e-4.
  XLA:GPU runs f32 products as TF32 unless told otherwise (operands rounded
  to 10 mantissa bits: the prefill was 5.4e-4 off), so the model traces its
  products at full precision for an f32 model itself (model.f32_products);
  the Pallas GEMV multiplies on the CUDA cores and its attention asks for
  full-precision f32 dots. Both backends are held to it. Measured with the
  precision set around the whole test instead (run 5): prefill 8.3e-7,
  decode 4.8e-7 at worst over the 64 steps; greedy tokens identical for all 64.
* bf16 on the GPU vs f32 on the CPU: BF16_TOL = 5e-2 (one bf16 rounding is
  2^-9 relative; it compounds over the layers). Measured: prefill 1.2e-2,
  decode 1.1e-2; the forced argmax agreed at 64 of 64 steps and greedy bf16
  tokens matched f32's for all 64. Greedy bf16 tokens may part from f32 ones
  at a near tie, so the test holds bf16 only to: the teacher-forced argmax
  agrees at every step whose CPU top-1 margin exceeds a quarter of the
  logits' standard deviation (35 of the 64 steps here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax


def _gpu_device():
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    return devs[0] if devs else None


GPU = _gpu_device()
pytestmark = pytest.mark.skipif(GPU is None, reason="no GPU: jax.devices('gpu') is empty")

F32_TOL = 1e-4
BF16_TOL = 5e-2
N_PROMPT = 600
N_STEPS = 64
MAX_CONTEXT = 1024


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite logits"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path_factory.mktemp("equiv_llama"))
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=MAX_CONTEXT,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    m = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    m.save_pretrained(out)
    return out


def _load(model_dir: str, dtype: str, device):
    from yalm_jax.loading.hf import SafetensorsSource, load_hf_config
    from yalm_jax.weights import build_weights

    cfg = load_hf_config(model_dir, dtype)
    # Under jax's default precision, not the conftest's "highest": the engine must ask for f32 products itself.
    with jax.default_device(device), jax.default_matmul_precision("default"):
        weights = build_weights(cfg, SafetensorsSource(model_dir))
    return cfg, jax.device_put(weights, device)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "backend"), donate_argnames=("cache",))
def _forced_decode(weights, cache, tokens, start, *, cfg, attn_len, backend):
    """Logits (len(tokens), vocab) of feeding `tokens` one at a time from position `start` (decode steps)."""
    from yalm_jax import model

    def step(cache, xs):
        tok, pos = xs
        h, cache = model.forward_hidden(weights, cache, tok[None], pos[None], cfg=cfg, attn_len=attn_len, backend=backend)
        return cache, model.logits_from_hidden(weights, h, cfg=cfg, backend=backend)[0]

    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    _, logits = lax.scan(step, cache, (tokens, positions))
    return logits


def _run(model_dir, prompt, dtype, device, backend, forced_tokens=None):
    """Prefill logits, greedy decode_chunk tokens and teacher-forced logits on one device."""
    from yalm_jax import generate as gen
    from yalm_jax import model
    from yalm_jax.sampling import SamplingParams

    cfg, weights = _load(model_dir, dtype, device)
    # Under jax's default precision, not the conftest's "highest": the engine must ask for f32 products itself.
    with jax.default_device(device), jax.default_matmul_precision("default"):
        cache = model.init_cache(cfg, MAX_CONTEXT)
        logits, cache = gen.prefill(weights, cache, prompt, 0, cfg, backend=backend)
        first = int(jnp.argmax(logits))
        # Keep a copy of the prompt's cache for the teacher-forced pass (decode_chunk donates its state).
        cache_copy = jax.tree_util.tree_map(jnp.copy, cache)
        state = gen.DecodeState(
            cache=cache, token=jnp.asarray(first, jnp.int32), pos=jnp.asarray(len(prompt), jnp.int32), key=jax.random.key(0),
            done=jnp.asarray(False),
        )  # fmt: skip
        attn_len = gen.attn_bucket(len(prompt) + N_STEPS, MAX_CONTEXT)
        tokens, _ = gen.decode_chunk(
            weights, state, SamplingParams.greedy(), jnp.asarray([-1], jnp.int32),
            cfg=cfg, n_steps=N_STEPS, attn_len=attn_len, backend=backend,
        )  # fmt: skip
        tokens = np.asarray(tokens)
        fed = np.concatenate([[first], tokens[:-1]]) if forced_tokens is None else forced_tokens
        forced = _forced_decode(
            weights, cache_copy, jnp.asarray(fed, jnp.int32), jnp.asarray(len(prompt), jnp.int32),
            cfg=cfg, attn_len=attn_len, backend=backend,
        )  # fmt: skip
        assert next(iter(forced.devices())) == device
    return {
        "prefill": np.asarray(logits, np.float32),
        "first": first,
        "tokens": tokens,
        "fed": fed,
        "forced": np.asarray(forced, np.float32),
    }


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return np.random.default_rng(7).integers(0, 512, N_PROMPT).tolist()


@pytest.fixture(scope="module")
def cpu_ref(model_dir, prompt):
    ref = _run(model_dir, prompt, "float32", jax.devices("cpu")[0], "xla")
    assert (ref["tokens"] >= 0).all()
    return ref


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_f32_gpu_matches_cpu(model_dir, prompt, cpu_ref, backend):
    out = _run(model_dir, prompt, "float32", GPU, backend, forced_tokens=cpu_ref["fed"])
    e_pre = _rel_err(out["prefill"], cpu_ref["prefill"])
    e_dec = [_rel_err(a, b) for a, b in zip(out["forced"], cpu_ref["forced"])]
    print(f"f32 {backend}: prefill rel err {e_pre:.2e}, decode max {max(e_dec):.2e} mean {np.mean(e_dec):.2e}")
    assert e_pre < F32_TOL
    assert max(e_dec) < F32_TOL
    assert out["first"] == cpu_ref["first"]
    np.testing.assert_array_equal(out["tokens"], cpu_ref["tokens"])


def test_bf16_gpu_close_to_cpu_f32(model_dir, prompt, cpu_ref):
    out = _run(model_dir, prompt, "bfloat16", GPU, "pallas", forced_tokens=cpu_ref["fed"])
    e_pre = _rel_err(out["prefill"], cpu_ref["prefill"])
    e_dec = [_rel_err(a, b) for a, b in zip(out["forced"], cpu_ref["forced"])]
    ref = cpu_ref["forced"]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.25 * ref.std(axis=-1)
    agree = out["forced"].argmax(-1) == ref.argmax(-1)
    same_greedy = int(np.argmin(np.append(out["tokens"] == cpu_ref["tokens"], False)))
    print(
        f"bf16 pallas: prefill rel err {e_pre:.2e}, decode max {max(e_dec):.2e}; forced argmax agrees "
        f"{agree.sum()}/{len(agree)} ({clear.sum()} clear-margin steps); greedy identical for {same_greedy} steps"
    )
    assert e_pre < BF16_TOL
    assert max(e_dec) < BF16_TOL
    assert clear.sum() >= N_STEPS // 4
    assert agree[clear].all()
