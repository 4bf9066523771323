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
    # A query at p sees keys at p - sliding_window + 1 .. p, as transformers masks
    # Mistral (kv_idx > q_idx - sliding_window): the window counts the query itself.
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
    try:
        return RopeScaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise UserError(f"llama3 rope scaling lacks {e.args[0]!r}") from None


_HF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float": "float32", "half": "float16"}


def hf_checkpoint_dtype(d: dict) -> str | None:
    """The dtype a config.json says its weights are stored in ("dtype" in 5.x, "torch_dtype" in 4.x)."""
    name = str(d.get("dtype") or d.get("torch_dtype") or "").removeprefix("torch.")
    return _HF_DTYPES.get(name)


def _hf_sliding_window(d: dict, arch: str, n_layers: int) -> int | None:
    """Mistral masks keys more than `sliding_window - 1` positions behind every query
    (transformers: kv_idx > q_idx - sliding_window); Qwen2 only with use_sliding_window."""
    window = d.get("sliding_window")
    if arch == "llama" or not window:
        return None
    if arch == "qwen2":
        if not d.get("use_sliding_window", False):
            return None
        first = int(d.get("max_window_layers", 28))
        types = d.get("layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)
        ]
        if all(t == "full_attention" for t in types):
            return None
        if not all(t == "sliding_attention" for t in types):
            raise UserError("Qwen2 with sliding windows on only some layers (max_window_layers) is not supported")
    return int(window)


def config_from_hf(d: dict, dtype: str | None = "float32") -> ModelConfig:
    """Builds a config from a transformers `config.json` (4.x or 5.x keys).

    `dtype=None` computes in the dtype the checkpoint declares (float32 if none).
    """
    archs = d.get("architectures") or []
    model_type = d.get("model_type", "")
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None) or (
        model_type if model_type in SUPPORTED_ARCHITECTURES and not archs else None
    )
    if arch is None:
        name = archs[0] if archs else model_type or "<none>"
        raise UserError(f"unsupported architecture {name!r}; supported: {', '.join(_HF_ARCH)}")
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise UserError(f"unsupported activation {act!r} for {arch}; supported: silu")
    if d.get("mlp_bias"):
        raise UserError("MLP biases (mlp_bias=true) are not supported")
    if arch != "qwen2" and d.get("attention_bias"):
        raise UserError("attention output biases (attention_bias=true) are not supported")
    # transformers 5.x moved rope_theta and rope_scaling into rope_parameters.
    rope = d.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        n_heads = int(d["num_attention_heads"])
        dim = int(d["hidden_size"])
        n_layers = int(d["num_hidden_layers"])
        vocab_size = int(d["vocab_size"])
        hidden_dim = int(d["intermediate_size"])
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}") from None
    sliding_window = _hf_sliding_window(d, arch, n_layers)
    return ModelConfig(
        arch=arch,
        vocab_size=vocab_size,
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(d.get("head_dim") or dim // n_heads),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        rope_scaling=_rope_scaling_from_hf(scaling),
        sliding_window=sliding_window,
        dtype=dtype or hf_checkpoint_dtype(d) or "float32",
    )
