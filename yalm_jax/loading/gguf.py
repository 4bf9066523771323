"""GGUF files (llama.cpp's format): metadata to a config, tensors dequantized on demand.

`open_gguf` reads the file memory-mapped with `gguf.GGUFReader`, builds the
`ModelConfig` from the metadata and the tokenizer from the vocabulary, and
returns a `GGUFSource` that serves each tensor under its transformers name, in
transformers' (out, in) layout, as float32: dequantized with
`gguf.quants.dequantize` only when `build_weights` asks for it, with the
Q/K rows that llama.cpp's converter permuted (llama) put back in transformers'
order, and Gemma's norm weights back to transformers' w (GGUF stores 1 + w).
A stacked expert tensor (blk.N.ffn_*_exps) is served one expert at a time.
"""

from __future__ import annotations

import os
import re

import numpy as np

from yalm_jax.config import ModelConfig, RopeScaling
from yalm_jax.errors import UserError
from yalm_jax.tokenizer import Tokenizer, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
# Every type gguf.quants dequantizes (gguf >= 0.17) that llama.cpp writes for these models' weights.
SUPPORTED_QUANTS = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ2_0", "TQ1_0",
)  # fmt: skip
# Mixtral is "llama" with experts (expert_count) in GGUF files.
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# GGUF tensor name -> transformers name; {i} is the layer.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
}
# Gemma 3 norms both sides of the attention and of the FFN; ffn_norm is its pre_feedforward_layernorm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_ARCH_LAYER_NAMES = {"llama": _LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
# Experts: stacked (n_experts, rows, cols) tensors, or one tensor per expert in older files.
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERTS_RE = re.compile(r"^(ffn_gate|ffn_up|ffn_down)_exps\.weight$")
_EXPERT_RE = re.compile(r"^(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight$")


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The transformers name of a GGUF tensor, or None for tensors the model does not read (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m:
        return None
    layer, rest = m.groups()
    names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    if rest in names:
        return f"model.layers.{layer}.{names[rest]}"
    if e := _EXPERT_RE.match(rest):
        return f"model.layers.{layer}.block_sparse_moe.experts.{e.group(2)}.{_EXPERT_NAMES[e.group(1)]}.weight"
    return None


def hf_expert_pattern(gguf_name: str) -> str | None:
    """For a stacked expert tensor (blk.N.ffn_*_exps), its experts' transformers name with {e} for the expert."""
    m = _LAYER_RE.match(gguf_name)
    e = _EXPERTS_RE.match(m.group(2)) if m else None
    if not e:
        return None
    return f"model.layers.{m.group(1)}.block_sparse_moe.experts.{{e}}.{_EXPERT_NAMES[e.group(1)]}.weight"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's `permute`, which interleaves each head's two rotary halves.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; transformers rotates (x_i, x_{i+d/2}).
    The converter reorders Q and K rows per head from [half0 | half1] to [h0_0, h1_0, h0_1, h1_1, ...];
    this reorders them back. Works for weights (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """Tensors of a GGUF file under transformers' names, dequantized lazily to float32."""

    def __init__(
        self, path: str, reader, n_heads: int, n_kv_heads: int, arch: str = "llama", norm_offset: float = 0.0
    ):
        self._path = path
        self._tensors = {}  # transformers name -> (GGUF tensor, expert index or None)
        self._heads = {}
        self._norm_offset = norm_offset
        for t in reader.tensors:
            name = hf_name(t.name, arch)
            pattern = hf_expert_pattern(t.name)
            if name is None and pattern is None:
                continue
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                raise UserError(
                    f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_QUANTS)}"
                )
            if pattern is not None:
                # GGUF dims run fastest-first, so the expert axis is the last one; t.data has it first.
                for e in range(int(t.shape[-1])):
                    self._tensors[pattern.format(e=e)] = (t, e)
                continue
            self._tensors[name] = (t, None)
            # llama.cpp permutes Q and K rows only for its llama rope (adjacent pairs); Gemma uses neox rope.
            if arch != "llama":
                continue
            if ".q_proj." in name:
                self._heads[name] = n_heads
            elif ".k_proj." in name:
                self._heads[name] = n_kv_heads

    def has(self, name: str) -> bool:
        return name in self._tensors

    def quant_type(self, name: str) -> str:
        return self._tensors[name][0].tensor_type.name

    def get_quantized(self, name: str, dtype: str = "float32"):
        """A tensor of a quant.GGUF_TYPES type as a host quant.QuantizedMatrix, its integers straight from its
        blocks; else None."""
        from yalm_jax import quant

        t, expert = self._tensors[name]
        if t.tensor_type.name not in quant.GGUF_TYPES or len(t.shape) != 2 or expert is not None:
            return None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = quant.from_gguf_blocks(np.asarray(t.data), t.tensor_type.name, shape, dtype)
        if w is not None and name in self._heads:  # the same row order as `get`: permute whole rows of blocks
            w = quant.map_rows(w, lambda a: unpermute_rows(a, self._heads[name]))
        return w

    def quantized_form(self, name: str):
        """The quant.StoredForm of `get_quantized(name)`'s matrix, without reading it; or None."""
        from yalm_jax import quant

        t, expert = self._tensors[name]
        if t.tensor_type.name not in quant.GGUF_TYPES or len(t.shape) != 2 or expert is not None:
            return None
        return quant.gguf_form(t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())))

    def get(self, name: str) -> np.ndarray:
        from gguf import quants

        t, expert = self._tensors[name]
        qtype = t.tensor_type.name
        # GGUF lists dimensions fastest-first: (in, out) for a matrix, i.e. numpy's (out, in) reversed.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = np.asarray(t.data)
        if expert is not None:  # one expert's rows of a stacked tensor: only its bytes are read
            shape, data = shape[1:], data.reshape(shape[0], -1)[expert]
        try:
            w = quants.dequantize(data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(shape)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(
                f"{self._path}: tensor {t.name} ({qtype}) cannot be read; the file may be corrupt ({e})"
            ) from None
        if name in self._heads:
            if shape[0] % (2 * self._heads[name]):
                raise UserError(f"{self._path}: tensor {t.name} has {shape[0]} rows, not a multiple of 2 x heads")
            w = unpermute_rows(w, self._heads[name])
        if self._norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(self._norm_offset)
        return w


def read_metadata(reader) -> dict:
    """Every key-value field as a Python value (arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _rope_scaling(meta: dict, arch: str, reader, head_dim: int, rope_theta: float) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise UserError(f"unsupported GGUF rope scaling type {kind!r}; supported: llama3 (rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    # llama.cpp stores Llama 3.x frequency scaling as per-frequency divisors; find the llama3 parameters behind them.
    from gguf import quants

    factors = np.asarray(quants.dequantize(np.asarray(freqs.data), freqs.tensor_type), np.float64).reshape(-1)
    factor = float(factors.max())
    ctx = int(meta.get(f"{arch}.context_length", 8192))
    for original in dict.fromkeys((8192, 4096, 2048, 16384, 32768, ctx)):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            s = RopeScaling(
                factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original
            )
            base = ModelConfig(
                arch="llama", vocab_size=1, dim=head_dim, hidden_dim=1, n_layers=1, n_heads=1, n_kv_heads=1,
                head_dim=head_dim, norm_eps=1e-5, rope_theta=rope_theta, max_position_embeddings=ctx,
            )
            unscaled = base.rope_inv_freq()
            scaled = ModelConfig(**{**base.__dict__, "rope_scaling": s}).rope_inv_freq()
            if factors.shape == unscaled.shape and np.allclose(unscaled / scaled, factors, rtol=1e-3):
                return s
    raise UserError("the GGUF file's rope_freqs do not match Llama 3 rope scaling; not supported")


def _config(meta: dict, reader, dtype: str, tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise UserError(f"the GGUF file lacks the metadata key {arch}.{key}")
        return value

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = meta.get(f"{arch}.attention.head_count_kv")
    head_dim = int(
        meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or dim // n_heads
    )
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = meta.get(f"{arch}.vocab_size") or (int(embd.shape[1]) if embd is not None else None)
    vocab = vocab or len(meta.get("tokenizer.ggml.tokens") or ())
    n_layers = int(need("block_count"))
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        dim=dim,
        hidden_dim=int(need("feed_forward_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv or n_heads),
        head_dim=head_dim,
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=_rope_scaling(meta, arch, reader, head_dim, rope_theta),
        dtype=dtype,
        n_experts=int(meta.get(f"{arch}.expert_count") or 0),
        n_experts_per_tok=int(meta.get(f"{arch}.expert_used_count") or 0),
        **(_gemma3(meta, n_layers, dim, n_heads, head_dim) if arch == "gemma3" else {}),
    )


def _gemma3(meta: dict, n_layers: int, dim: int, n_heads: int, head_dim: int) -> dict:
    """Gemma 3's fields, with llama.cpp's defaults for what older files leave out."""
    window = meta.get("gemma3.attention.sliding_window")
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: true where the layer slides
        sliding = tuple(bool(x) for x in pattern)
    else:  # every pattern-th layer is global
        sliding = tuple((i + 1) % int(pattern) != 0 for i in range(n_layers))
    softcap = meta.get("gemma3.final_logit_softcapping")
    return dict(
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        norm_weight_offset=1.0,
        embed_scale=dim**0.5,
        # llama.cpp: query_pre_attn_scalar is head_dim, except for the 27B model (62 layers): dim / n_heads.
        attn_scale=(dim / n_heads) ** -0.5 if n_layers == 62 else None,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding if window and not all(sliding) else None,
        rope_local_theta=float(meta.get("gemma3.rope.freq_base_swa", 10000.0)),
        final_softcap=float(softcap) if softcap else None,
    )


def _open_reader(path: str):
    from gguf import GGUFReader

    if not is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # GGUFReader raises ValueError, IndexError, struct errors... on damaged files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable GGUF file; it may be truncated or corrupt ({detail})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise UserError(f"{path}: tensor {t.name} extends past the end of the file; the file is truncated")
    return reader


def open_gguf(path: str, dtype: str = "float32") -> tuple[ModelConfig, GGUFSource, Tokenizer]:
    reader = _open_reader(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise UserError(f"{path}: GGUF metadata cannot be read; the file may be corrupt ({e})") from None
    names = {t.name for t in reader.tensors}
    try:
        cfg = _config(meta, reader, dtype, names)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    source = GGUFSource(path, reader, cfg.n_heads, cfg.n_kv_heads, cfg.arch, cfg.norm_weight_offset)
    return cfg, source, tokenizer_from_gguf(meta)
