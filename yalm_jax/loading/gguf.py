"""GGUF files (llama.cpp's format): metadata to a config, tensors dequantized on demand.

`open_gguf` reads the file memory-mapped with `gguf.GGUFReader`, builds the
`ModelConfig` from the metadata and the tokenizer from the vocabulary, and
returns a `GGUFSource` that serves each tensor under its transformers name, in
transformers' (out, in) layout, as float32: dequantized with
`gguf.quants.dequantize` only when `build_weights` asks for it, and with the
Q/K rows that llama.cpp's converter permuted put back in transformers' order.
"""

from __future__ import annotations

import os
import re

import numpy as np

from yalm_jax.config import ModelConfig, RopeScaling
from yalm_jax.errors import UserError
from yalm_jax.tokenizer import Tokenizer, tokenizer_from_gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)

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
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hf_name(gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor, or None for tensors the model does not read (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


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

    def __init__(self, path: str, reader, n_heads: int, n_kv_heads: int):
        self._path = path
        self._tensors = {}
        self._heads = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                raise UserError(
                    f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_QUANTS)}"
                )
            self._tensors[name] = t
            if ".q_proj." in name:
                self._heads[name] = n_heads
            elif ".k_proj." in name:
                self._heads[name] = n_kv_heads

    def has(self, name: str) -> bool:
        return name in self._tensors

    def quant_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get(self, name: str) -> np.ndarray:
        from gguf import quants

        t = self._tensors[name]
        qtype = t.tensor_type.name
        # GGUF lists dimensions fastest-first: (in, out) for a matrix, i.e. numpy's (out, in) reversed.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            w = quants.dequantize(np.asarray(t.data), t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(shape)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(
                f"{self._path}: tensor {t.name} ({qtype}) cannot be read; the file may be corrupt ({e})"
            ) from None
        if name in self._heads:
            if shape[0] % (2 * self._heads[name]):
                raise UserError(f"{self._path}: tensor {t.name} has {shape[0]} rows, not a multiple of 2 x heads")
            w = unpermute_rows(w, self._heads[name])
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
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        dim=dim,
        hidden_dim=int(need("feed_forward_length")),
        n_layers=int(need("block_count")),
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
    source = GGUFSource(path, reader, cfg.n_heads, cfg.n_kv_heads)
    return cfg, source, tokenizer_from_gguf(meta)
