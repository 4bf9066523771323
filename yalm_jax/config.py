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

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma3")
DTYPES = ("float32", "bfloat16", "float16")
# Activations of the gated FFN: silu (Llama) and GELU with the tanh approximation (Gemma).
ACTIVATIONS = ("silu", "gelu_tanh")


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
    # Which layers use sliding_window (Gemma 3 alternates); None: every layer.
    sliding_layers: tuple[bool, ...] | None = None
    # The rope base of the sliding-window layers (Gemma 3's rope_local_base_freq); None: rope_theta.
    rope_local_theta: float | None = None
    dtype: str = "float32"
    activation: str = "silu"
    # RMSNorm of each head's query and key before rope (Qwen3, Gemma 3).
    qk_norm: bool = False
    # RMSNorm of the attention and FFN outputs before their residual adds (Gemma 3).
    post_norms: bool = False
    # Checkpoints that store RMSNorm weights as w - 1 (Gemma) have 1 here; build_weights adds it back once.
    norm_weight_offset: float = 0.0
    # Embeddings are multiplied by this, rounded to the compute dtype (Gemma: sqrt(dim)).
    embed_scale: float | None = None
    # Softmax scale of attention scores; None: head_dim ** -0.5.
    attn_scale: float | None = None
    # cap * tanh(logits / cap) of the final logits, when set.
    final_softcap: float | None = None
    # Mixture of experts (Mixtral): n_experts FFNs, each token routed to the top n_experts_per_tok.
    n_experts: int = 0
    n_experts_per_tok: int = 0
    # Tensor parallelism (see parallel.py): the weights are split over the first `tp` devices.
    # tp_axis is set only on the per-device view, `shard()`, whose ops reduce over that mesh axis.
    tp: int = 1
    tp_axis: str | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"unsupported activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.n_layers:
            raise UserError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if self.n_experts and not 0 < self.n_experts_per_tok <= self.n_experts:
            raise UserError(f"n_experts_per_tok={self.n_experts_per_tok} must be in 1..n_experts={self.n_experts}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def with_dtype(self, dtype: str) -> "ModelConfig":
        return dataclasses.replace(self, dtype=dtype)

    def shard(self) -> "ModelConfig":
        """The model each of the `tp` devices runs: its query heads, kv heads and FFN slice (see parallel.py)."""
        return dataclasses.replace(
            self,
            n_heads=self.n_heads // self.tp,
            n_kv_heads=max(1, self.n_kv_heads // self.tp),
            hidden_dim=self.hidden_dim // self.tp,
            tp_axis="tp",
        )

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or self.sliding_layers[layer])

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_inv_freq(self, layer: int | None = None) -> np.ndarray:
        """Inverse frequencies of the rotary embedding of `layer`, float32, shape (head_dim // 2,).

        Sliding-window layers use rope_local_theta (when set) and no frequency scaling, as Gemma 3 does.
        """
        local = layer is not None and self.rope_local_theta is not None and self.is_sliding(layer)
        theta = self.rope_local_theta if local else self.rope_theta
        inv_freq = 1.0 / (theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        s = None if local else self.rope_scaling
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


_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Gemma3ForCausalLM": "gemma3",
}
_HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float": "float32", "half": "float16"}


def hf_checkpoint_dtype(d: dict) -> str | None:
    """The dtype a config.json says its weights are stored in ("dtype" in 5.x, "torch_dtype" in 4.x)."""
    name = str(d.get("dtype") or d.get("torch_dtype") or "").removeprefix("torch.")
    return _HF_DTYPES.get(name)


def _hf_layer_types(d: dict, arch: str, n_layers: int) -> list[str] | None:
    """Each layer's "sliding_attention" or "full_attention", from layer_types or the 4.x keys behind it."""
    types = d.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise UserError(f"layer_types has {len(types)} entries for {n_layers} layers")
        return list(types)
    if arch == "gemma3":
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if arch in ("qwen2", "qwen3"):
        first = int(d.get("max_window_layers", 28))
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return None


def _hf_sliding_window(d: dict, arch: str, n_layers: int) -> tuple[int | None, tuple[bool, ...] | None]:
    """The window and which layers use it (None: all).

    Mistral and Mixtral mask keys more than `sliding_window - 1` positions behind every query
    (transformers: kv_idx > q_idx - sliding_window) on every layer; Qwen2/3 only with
    use_sliding_window and from max_window_layers on; Gemma 3 on the layers layer_types names.
    """
    window = d.get("sliding_window")
    if arch == "llama" or not window:
        return None, None
    if arch in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        return None, None
    types = _hf_layer_types(d, arch, n_layers)
    if types is None or all(t == "sliding_attention" for t in types):
        return int(window), None
    if all(t == "full_attention" for t in types):
        return None, None
    if arch == "qwen2":
        raise UserError("Qwen2 with sliding windows on only some layers (max_window_layers) is not supported")
    return int(window), tuple(t == "sliding_attention" for t in types)


def _hf_rope(d: dict, arch: str) -> tuple[float, dict | None, float | None]:
    """rope_theta, the scaling dict (or None) and the sliding layers' own base (Gemma 3), from 4.x or 5.x keys."""
    # transformers 5.x moved rope_theta and rope_scaling into rope_parameters, per layer type for Gemma 3.
    rope = d.get("rope_parameters") or {}
    local_theta = None
    if arch == "gemma3":
        if "full_attention" in rope:
            local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
            rope = rope["full_attention"] or {}
        local_theta = float(local_theta or d.get("rope_local_base_freq", 10000.0))
    default_theta = 1000000.0 if arch == "gemma3" else 10000.0
    rope_theta = rope.get("rope_theta", d.get("rope_theta", default_theta))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return float(rope_theta), scaling, local_theta


def config_from_hf(d: dict, dtype: str | None = "float32") -> ModelConfig:
    """Builds a config from a transformers `config.json` (4.x or 5.x keys).

    `dtype=None` computes in the dtype the checkpoint declares (float32 if none).
    """
    archs = d.get("architectures") or []
    model_type = _HF_MODEL_TYPES.get(d.get("model_type", ""), d.get("model_type", ""))
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None) or (
        model_type if model_type in SUPPORTED_ARCHITECTURES and not archs else None
    )
    if arch is None:
        name = archs[0] if archs else model_type or "<none>"
        raise UserError(f"unsupported architecture {name!r}; supported: {', '.join(_HF_ARCH)}")
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act not in _HF_ACTIVATIONS:
        raise UserError(f"unsupported activation {act!r} for {arch}; supported: {', '.join(_HF_ACTIVATIONS)}")
    if d.get("mlp_bias"):
        raise UserError("MLP biases (mlp_bias=true) are not supported")
    if arch != "qwen2" and d.get("attention_bias"):
        raise UserError("attention output biases (attention_bias=true) are not supported")
    if d.get("use_bidirectional_attention"):
        raise UserError("bidirectional attention (use_bidirectional_attention=true) is not supported")
    rope_theta, scaling, local_theta = _hf_rope(d, arch)
    try:
        n_heads = int(d["num_attention_heads"])
        dim = int(d["hidden_size"])
        n_layers = int(d["num_hidden_layers"])
        vocab_size = int(d["vocab_size"])
        hidden_dim = int(d["intermediate_size"])
        n_experts = int(d["num_local_experts"]) if arch == "mixtral" else 0
        n_experts_per_tok = int(d["num_experts_per_tok"]) if arch == "mixtral" else 0
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}") from None
    sliding_window, sliding_layers = _hf_sliding_window(d, arch, n_layers)
    head_dim = int(d.get("head_dim") or dim // n_heads)
    gemma = arch == "gemma3"
    return ModelConfig(
        arch=arch,
        vocab_size=vocab_size,
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        qkv_bias=arch == "qwen2",
        rope_scaling=_rope_scaling_from_hf(scaling),
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        rope_local_theta=local_theta,
        dtype=dtype or hf_checkpoint_dtype(d) or "float32",
        activation=_HF_ACTIVATIONS[act],
        qk_norm=arch in ("qwen3", "gemma3"),
        post_norms=gemma,
        norm_weight_offset=1.0 if gemma else 0.0,
        embed_scale=dim**0.5 if gemma else None,
        attn_scale=_attn_scale(d, head_dim) if gemma else None,
        final_softcap=_float_or_none(d.get("final_logit_softcapping")) if gemma else None,
        n_experts=n_experts,
        n_experts_per_tok=n_experts_per_tok,
    )


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


def _attn_scale(d: dict, head_dim: int) -> float | None:
    """Gemma's query_pre_attn_scalar ** -0.5; None where that is the usual head_dim ** -0.5."""
    scalar = float(d.get("query_pre_attn_scalar", 256))
    return None if scalar == head_dim else scalar**-0.5
