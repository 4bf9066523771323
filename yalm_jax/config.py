"""The static, hashable description of a model.

`ModelConfig` is what `jax.jit` specialises on: every field is a Python scalar,
string or tuple, so two configs that describe the same model hash the same.
Both loaders (HF directories and GGUF files) produce one; nothing past the
loaders knows which format a model came from.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from yalm_jax.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    # Keys more than this many positions behind a query are masked (Mistral v0.1).
    sliding_window: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def with_dtype(self, dtype: str) -> "ModelConfig":
        return dataclasses.replace(self, dtype=dtype)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies of the rotary embedding, float32, shape (head_dim // 2,)."""
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        s = self.rope_scaling
        if s is not None:
            # Same piecewise rule as transformers' _compute_llama3_parameters.
            low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
            high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled)
        return inv_freq.astype(np.float32)


def _rope_scaling_from_hf(d: dict | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return RopeScaling(
        factor=float(d["factor"]),
        low_freq_factor=float(d["low_freq_factor"]),
        high_freq_factor=float(d["high_freq_factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
    )


_HF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def config_from_hf(d: dict, dtype: str = "float32") -> ModelConfig:
    """Builds a config from a transformers `config.json` (4.x or 5.x keys)."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type", "")
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None) or (
        model_type if model_type in SUPPORTED_ARCHITECTURES else None
    )
    if arch is None:
        name = archs[0] if archs else model_type or "<none>"
        raise UserError(f"unsupported architecture {name!r}; supported: {', '.join(_HF_ARCH)}")
    # transformers 5.x moved rope_theta and rope_scaling into rope_parameters.
    rope = d.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_heads = int(d["num_attention_heads"])
    dim = int(d["hidden_size"])
    sliding_window = d.get("sliding_window") if d.get("use_sliding_window", arch == "mistral") else None
    if sliding_window and arch == "qwen2":
        raise UserError("Qwen2 per-layer sliding windows (use_sliding_window=true) are not supported yet")
    return ModelConfig(
        arch=arch,
        vocab_size=int(d["vocab_size"]),
        dim=dim,
        hidden_dim=int(d["intermediate_size"]),
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or dim // n_heads),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
        rope_scaling=_rope_scaling_from_hf(scaling),
        sliding_window=int(sliding_window) if sliding_window else None,
        dtype=dtype,
    )
