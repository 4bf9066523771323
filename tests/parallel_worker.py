"""Runs the tensor-parallel checks on 4 virtual CPU devices (or with --gpu on the GPUs) and prints their results
as JSON.

Started by test_parallel.py in a subprocess, so that XLA_FLAGS
(--xla_force_host_platform_device_count=4) is set before jax is imported and
the rest of the suite keeps one device. With --gpu the same checks run on the
host's GPUs at every tp (2, 4) that they allow, the Pallas kernels compiled
rather than interpreted, and the collectives through NCCL. Not collected by
pytest (no test_ prefix).
"""

from __future__ import annotations

import os
import sys

ON_GPU = "--gpu" in sys.argv
if not ON_GPU:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_prefill import random_weights  # noqa: E402

from pallas_kernels import gemv_quant  # noqa: E402
from yalm_jax import generate, model, parallel, quant  # noqa: E402
from yalm_jax.config import ModelConfig  # noqa: E402
from yalm_jax.errors import UserError  # noqa: E402
from yalm_jax.sampling import SamplingParams  # noqa: E402
from yalm_jax.weights import field_nbytes  # noqa: E402

_BASE = dict(
    vocab_size=96, dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32,
    norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
)  # fmt: skip
CONFIGS = {
    "llama_gqa": ModelConfig(arch="llama", **_BASE),
    # 2 kv heads: at tp=4 each kv head is replicated on 2 devices; q/k/v biases.
    "qwen2_kv2": ModelConfig(arch="qwen2", qkv_bias=True, **{**_BASE, "n_kv_heads": 2}),
    "mixtral": ModelConfig(arch="mixtral", n_experts=4, n_experts_per_tok=2, **_BASE),
    # Tied embeddings, a vocabulary 4 does not divide (replicated at tp=4), qk norms, post norms, windows, softcap.
    "gemma3": ModelConfig(
        arch="gemma3", qk_norm=True, post_norms=True, tie_embeddings=True, final_softcap=3.0, embed_scale=8.0,
        sliding_window=4, sliding_layers=(True, False), activation="gelu_tanh", attn_scale=0.2,
        **{**_BASE, "vocab_size": 98},
    ),  # fmt: skip
}
TPS = tuple(tp for tp in (2, 4) if tp <= jax.device_count())
# The path whose greedy tokens are compared: on the CPU the xla one (the kernels' interpreter is slow).
DECODE_BACKEND = "pallas" if ON_GPU else "xla"
# Quantized weights, split as the dense ones are (parallel.place): int4 in groups of 32 with mins (wo's and w2's
# columns split in whole groups); int8 with one scale a row, whose scales each device's slice of a row repeats;
# and int4 with int8 activations, w13's kernel rounding h for w2's, whose partial products then go through the
# psum. Kept quantized on the CPU (as on a GPU), and a hidden size whose shards hold whole groups of 32.
BUILD = {
    "llama_int4": dict(quant="int4:32"),
    "llama_int8_a8": dict(quant="int8", int8_activations=True),
    "llama_int4_a8": dict(quant="int4:32", int8_activations=True),
}
CONFIGS |= {name: ModelConfig(arch="llama", **{**_BASE, "hidden_dim": 128}) for name in BUILD}
quant.DEQUANTIZE_ON_CPU = False
gemv_quant.MIN_INT8_OUT_PROGRAMS = 1  # so the tiny w13 rounds h for w2, as Mistral-7B's does
PROMPT = [3, 17, 5, 90, 44, 1, 2, 8, 60, 61, 11, 12, 13]
CACHE = 64
STEPS = 32


def logits_and_decode(w, cfg, backend):
    cache = model.init_cache(cfg, CACHE)
    n = len(PROMPT)
    prefill, cache = model.forward(
        w, cache, jnp.asarray(PROMPT, jnp.int32), jnp.arange(n, dtype=jnp.int32), cfg=cfg, backend=backend
    )
    step, cache = model.forward(
        w, cache, jnp.asarray([7], jnp.int32), jnp.asarray([n], jnp.int32), cfg=cfg, backend=backend
    )
    return np.asarray(prefill), np.asarray(step), cache


def greedy(w, cfg, backend):
    """STEPS greedy tokens through the library's prefill and on-device decode loop."""
    cache = model.init_cache(cfg, CACHE)
    logits, cache = generate.prefill(w, cache, PROMPT, 0, cfg, chunk=8, backend=backend)
    token = jnp.argmax(logits).astype(jnp.int32)
    state = generate.DecodeState(
        cache=cache, token=token, pos=jnp.asarray(len(PROMPT), jnp.int32), key=jax.random.key(0),
        done=jnp.asarray(False),
    )  # fmt: skip
    out = [int(token)]
    while len(out) < STEPS:
        tokens, state = generate.decode_chunk(
            w, state, SamplingParams.greedy(), jnp.asarray([-1], jnp.int32),
            cfg=cfg, n_steps=16, attn_len=CACHE, backend=backend,
        )  # fmt: skip
        out += np.asarray(tokens).tolist()
    return out[:STEPS]


def bytes_check(w, cfg):
    """Per device: what it holds, and 1/tp of the split tensors plus all of the replicated ones."""
    specs = jax.tree_util.tree_leaves(parallel.weight_specs(cfg, w), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_leaves(w)
    expected = sum(x.nbytes // cfg.tp if any(s) else x.nbytes for x, s in zip(leaves, specs, strict=True))
    held = parallel.per_device_bytes(w)
    cache = model.init_cache(cfg, CACHE)
    return {
        "held": sorted(held.values()),
        "expected": expected,
        "devices": len(held),
        "cache_shard_shape": list(cache.k[0].addressable_shards[0].data.shape),
    }


def main():
    results = {}
    for name, cfg in CONFIGS.items():
        seed = int(np.random.default_rng().integers(2**31))  # fresh, and the same draws for every tp below
        w1 = random_weights(cfg, seed, **BUILD.get(name, {}))
        ref = {b: logits_and_decode(w1, cfg, b) for b in ("xla", "pallas")}
        ref_tokens = greedy(w1, cfg, DECODE_BACKEND)
        for tp in TPS:
            c = dataclasses.replace(cfg, tp=tp)
            w = random_weights(c, seed, **BUILD.get(name, {}))
            r = {"bytes": bytes_check(w, c), "single_bytes": w1.nbytes()}
            for b in ("xla", "pallas") if tp == 2 or ON_GPU else ("xla",):  # interpreted pallas once, to keep it quick
                prefill, step, cache = logits_and_decode(w, c, b)
                r[b] = {
                    "prefill_err": float(np.abs(prefill - ref[b][0]).max()),
                    "decode_err": float(np.abs(step - ref[b][1]).max()),
                    "scale": float(np.abs(ref[b][0]).max()),
                }
            # The kernels themselves, on one device, against the xla path.
            r["pallas_vs_xla"] = [float(np.abs(ref["pallas"][i] - ref["xla"][i]).max()) for i in (0, 1)]
            r["tokens"] = greedy(w, c, DECODE_BACKEND)
            r["ref_tokens"] = ref_tokens
            results[f"{name}/tp{tp}"] = r
    errors = {}
    for label, cfg, tp, build in [
        ("heads", dataclasses.replace(CONFIGS["llama_gqa"], n_heads=6, n_kv_heads=3), 4, {}),
        ("kv_heads", dataclasses.replace(CONFIGS["llama_gqa"], n_heads=12, n_kv_heads=6), 4, {}),
        ("devices", CONFIGS["llama_gqa"], 8, {}),
        ("quant_groups", CONFIGS["llama_gqa"], 2, BUILD["llama_int4"]),  # w2's 96 columns: 48 a device
    ]:
        try:
            random_weights(dataclasses.replace(cfg, tp=tp), **build)
            errors[label] = None
        except UserError as e:
            errors[label] = str(e)
    try:
        parallel.check_fits(CONFIGS["llama_gqa"], field_nbytes(CONFIGS["llama_gqa"]), limit=1000)
        errors["fits"] = None
    except UserError as e:
        errors["fits"] = str(e)
    print(json.dumps({"cases": results, "errors": errors, "generator": generator_runs(sys.argv[1]), "tps": TPS,
                      "lowered_tp2": lowered_tp2_step()}))  # fmt: skip


def lowered_tp2_step() -> dict:
    """A tp=2 decode step as lowered for the GPU (no GPU needed): its Triton kernels, in program order, and its
    all-reduces, so that a sharded projection falling off its kernel shows."""
    from test_gpu_lowering import gpu_lowering, triton_kernels

    from yalm_jax import ops

    cfg = dataclasses.replace(CONFIGS["llama_gqa"], tp=2)
    w, cache = random_weights(cfg), model.init_cache(cfg, CACHE)
    token, pos = jnp.asarray([7], jnp.int32), jnp.asarray([3], jnp.int32)
    interpret, ops._interpret = ops._interpret, lambda: False
    jax.clear_caches()  # the interpreted kernels' traces of this same step, from the checks above
    try:
        step = lambda w, c, t, p: model.forward(w, c, t, p, cfg=cfg, backend="pallas")  # noqa: E731
        kernels = triton_kernels(step, w, cache, token, pos, own_mesh=True)
        all_reduces = gpu_lowering(step, w, cache, token, pos, own_mesh=True).count('"stablehlo.all_reduce"')
    except RuntimeError as e:
        if "No supported GPU devices" not in str(e):
            raise
        return {"skip": f"jax {jax.__version__} lowers Triton kernels only for a card it sees or a context mesh names"}
    finally:
        ops._interpret = interpret
    return {"kernels": kernels, "all_reduces": all_reduces, "n_layers": cfg.n_layers}


def generator_runs(tmp_dir: str) -> dict:
    """Generator on a tiny HF checkpoint loaded with load_model(tp=...): two turns, the second reusing the cache."""
    from conftest import make_tiny_chat_model

    from yalm_jax.generate import Generator
    from yalm_jax.loading import load_model

    path = make_tiny_chat_model(tmp_dir, "llama")
    out = {}
    for tp in (1, 2):
        lm = load_model(path, tp=tp)
        g = Generator(lm.weights, lm.cfg, lm.tokenizer, max_context=128, decode_chunk=8)
        ids = lm.tokenizer.encode("Once upon a time")
        first = g.generate(ids, max_new_tokens=20)
        second = g.generate(ids + first.token_ids + ids, max_new_tokens=12)
        out[tp] = {"ids": [first.token_ids, second.token_ids], "reused": second.prefilled < len(second.prompt_ids)}
    return out


if __name__ == "__main__":
    main()
