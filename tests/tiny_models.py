"""Tiny random transformers checkpoints, one per supported architecture variant, and the
helpers that compare our model with transformers on them (test_model_vs_transformers.py,
test_architectures.py; conftest.py builds them once per session)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

PROMPT_LEN = 24
# Greedy runs compare argmaxes, which a near-tie (two logits within float error) could flip on an
# unlucky draw; so the greedy prompt is fixed, while the logits checks draw a fresh prompt every run.
GREEDY_PROMPT = [17, 101, 4, 66, 90, 33, 2, 125]
GREEDY_NEW = 32
TOL_F32 = 1e-4

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Frequencies with wavelengths above 8 are scaled, those between 2 and 8 are
    # smoothed; the prompt's positions reach 23, well past 8.
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),  # fmt: skip
    "explicit_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32)),
    "mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "tied_embeddings": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2_qkv_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    # Layer 1 slides (layer_types from max_window_layers), layer 0 does not.
    "qwen3_sliding_layers": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top1": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=3, num_experts_per_tok=1)),
    # Sliding, sliding, global; its own local rope base; a score scale other than head_dim ** -0.5.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=5,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    "gemma3_final_softcap": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    ),
}


def randomize(m) -> None:
    """Every tensor away from its init (transformers zero-inits biases and one-inits norms);
    Gemma's norms are stored as w - 1, the others around 1."""
    import torch

    gen = torch.Generator().manual_seed(0)
    gemma = "Gemma" in type(m).__name__
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.3 * noise)
            elif gemma and "embed" in name:
                # Scaled by sqrt(dim) and tied to the output: larger, and greedy repeats the last token forever.
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.15 * noise)


def make_hf_model(out_dir, variant: str, torch_dtype=None):
    import transformers

    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**BASE, **extra})
    m = getattr(transformers, model_cls)(config).eval()
    randomize(m)
    if torch_dtype is not None:
        m = m.to(torch_dtype)
    m.save_pretrained(out_dir)
    return m


def reference_logits(m, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return m.float()(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()


def hf_generate_greedy(m, prompt: list[int], n: int, eos_ids=None) -> list[int]:
    """transformers' greedy continuation of `prompt` (new tokens only); eos_ids=None never stops early."""
    import torch

    m.generation_config.eos_token_id = list(eos_ids) if eos_ids else None
    with torch.no_grad():
        out = m.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def load(model_dir, dtype: str = "float32", **cfg_changes):
    from yalm_jax.loading import hf
    from yalm_jax.weights import build_weights

    cfg = dataclasses.replace(hf.load_hf_config(str(model_dir), dtype), **cfg_changes)
    return cfg, build_weights(cfg, hf.SafetensorsSource(str(model_dir)))


def our_logits(model_dir, tokens: np.ndarray, dtype: str = "float32", **cfg_changes) -> np.ndarray:
    from yalm_jax import model

    cfg, weights = load(model_dir, dtype, **cfg_changes)
    cache = model.init_cache(cfg, 32)
    positions = jnp.arange(len(tokens), dtype=jnp.int32)
    logits, _ = model.forward(weights, cache, jnp.asarray(tokens, jnp.int32), positions, cfg=cfg)
    return np.asarray(logits)


def our_greedy(cfg, weights, prompt: list[int], n: int) -> list[int]:
    """A prefill of `prompt`, then n - 1 single-token steps through `model.forward` (the decode path)."""
    from yalm_jax import model

    cache = model.init_cache(cfg, len(prompt) + n)
    logits, cache = model.forward(
        weights, cache, jnp.asarray(prompt, jnp.int32), jnp.arange(len(prompt), dtype=jnp.int32), cfg=cfg
    )
    out = [int(np.argmax(np.asarray(logits[-1])))]
    for pos in range(len(prompt), len(prompt) + n - 1):
        logits, cache = model.forward(
            weights, cache, jnp.asarray(out[-1:], jnp.int32), jnp.asarray([pos], jnp.int32), cfg=cfg
        )
        out.append(int(np.argmax(np.asarray(logits[0]))))
    return out


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
