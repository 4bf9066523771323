"""GGUF files (llama.cpp's format): metadata to a config, tensors dequantized on demand.

`open_gguf` reads the file's header (`read_gguf`: its metadata and tensor
table, the tensors' bytes memory-mapped), builds the
`ModelConfig` from the metadata and the tokenizer from the vocabulary, and
returns a `GGUFSource` that serves each tensor under its transformers name, in
transformers' (out, in) layout, as float32: dequantized with
`gguf.quants.dequantize` only when `build_weights` asks for it, with the
Q/K rows that llama.cpp's converter permuted (llama) put back in transformers'
order, and Gemma's norm weights back to transformers' w (GGUF stores 1 + w).
A stacked expert tensor (blk.N.ffn_*_exps) is served one expert at a time.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
import struct
from typing import Any

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
        self, path: str, tensors: list[GGUFTensor], n_heads: int, n_kv_heads: int, arch: str = "llama",
        norm_offset: float = 0.0,
    ):  # fmt: skip
        self._path = path
        self._tensors = {}  # transformers name -> (GGUF tensor, expert index or None)
        self._heads = {}
        self._norm_offset = norm_offset
        for t in tensors:
            name = hf_name(t.name, arch)
            pattern = hf_expert_pattern(t.name)
            if name is None and pattern is None:
                continue
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                raise UserError(
                    f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_QUANTS)}"
                )
            if pattern is not None:  # the expert axis first
                for e in range(t.shape[0]):
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

    # Its blocks have a dense form of their own, gguf's dequantization, which transformers loads too: what the
    # CPU computes with (quant.auto_choice).
    dense_form = True

    @property
    def quantized(self) -> bool:
        """Whether a matrix is stored in blocks that --quant=native keeps."""
        from yalm_jax import quant

        return any(t.tensor_type.name in quant.GGUF_TYPES for t, _ in self._tensors.values())

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
        w = quant.from_gguf_blocks(t.data, t.tensor_type.name, t.shape, dtype)
        if w is not None and name in self._heads:  # the same row order as `get`: permute whole rows of blocks
            w = quant.map_rows(w, lambda a: unpermute_rows(a, self._heads[name]))
        return w

    def quantized_form(self, name: str):
        """The quant.StoredForm of `get_quantized(name)`'s matrix, without reading it; or None."""
        from yalm_jax import quant

        t, expert = self._tensors[name]
        if t.tensor_type.name not in quant.GGUF_TYPES or len(t.shape) != 2 or expert is not None:
            return None
        return quant.gguf_form(t.tensor_type.name, t.shape)

    def get(self, name: str) -> np.ndarray:
        from gguf import quants

        t, expert = self._tensors[name]
        qtype = t.tensor_type.name
        shape, data = t.shape, t.data
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


def _rope_scaling(
    meta: dict, arch: str, tensors: list[GGUFTensor], head_dim: int, rope_theta: float
) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise UserError(f"unsupported GGUF rope scaling type {kind!r}; supported: llama3 (rope_freqs)")
    freqs = next((t for t in tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    # llama.cpp stores Llama 3.x frequency scaling as per-frequency divisors; find the llama3 parameters behind them.
    from gguf import quants

    factors = np.asarray(quants.dequantize(freqs.data, freqs.tensor_type), np.float64).reshape(-1)
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


# GGUF's 16-bit float types as compute dtypes (stored_dtype).
_FLOAT_TYPES = {"F16": "float16", "BF16": "bfloat16"}


def stored_dtype(tensors: list[GGUFTensor]) -> str:
    """The dtype a file's matrices are stored in: F16 or BF16 where every one of them is, else float32 (F32 and
    quantized files; their 1-D norms are F32 in every file)."""
    kinds = {t.tensor_type.name for t in tensors if len(t.shape) == 2}
    return _FLOAT_TYPES.get(kinds.pop(), "float32") if len(kinds) == 1 else "float32"


def _config(meta: dict, tensors: list[GGUFTensor], dtype: str | None) -> ModelConfig:
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
    tensor_names = {t.name for t in tensors}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    vocab = meta.get(f"{arch}.vocab_size") or (embd.shape[0] if embd is not None else None)
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
        rope_scaling=_rope_scaling(meta, arch, tensors, head_dim, rope_theta),
        dtype=dtype or stored_dtype(tensors),
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


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy's order: GGUF lists dimensions fastest-first, (in, out) for a matrix
    data: np.ndarray  # its bytes, memory-mapped, (*shape[:-1], bytes a row)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    metadata: dict  # every key-value field as a Python value, arrays as lists
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads through a GGUF header (GGUF v2 / v3: 64-bit counts and lengths)."""

    # GGUF's value types: the scalars by struct format, numeric arrays by numpy dtype; 8 string, 9 array.
    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return str(self.buf[self.pos - n : self.pos], "utf-8")

    def value(self, vtype: int):
        if vtype == self.STRING:
            return self.string()
        if vtype != self.ARRAY:
            return self.scalar(self.SCALARS[vtype])
        itype, count = self.scalar("<I"), self.scalar("<Q")
        if itype in self.SCALARS:  # numbers (and bools) in one read: a vocabulary's scores and types
            a = np.frombuffer(self.buf, np.dtype(self.SCALARS[itype]), count, self.pos)
            self.pos += a.nbytes
            return a.tolist()
        return [self.value(itype) for _ in range(count)]


def read_gguf(path: str) -> GGUFFile:
    """A GGUF file's metadata and tensor table, its tensors' bytes mapped, not read. Parsed here rather than by
    gguf.GGUFReader, which makes numpy views of every vocabulary entry: SmolLM2's header took it 1.8 s and Gemma
    3's (262,144 tokens) 8.6 s on the 2-core CPU, most of their whole load."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if not is_gguf(path):
        raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf)
    cur.pos = len(GGUF_MAGIC)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are; the file may be corrupt)")
    try:
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        metadata = {}
        for _ in range(n_fields):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        table = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.scalar("<I")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            table.append((name, dims, GGMLQuantizationType(cur.scalar("<I")), cur.scalar("<Q")))
    except (struct.error, ValueError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise UserError(f"{path}: not a readable GGUF file; it may be truncated or corrupt ({e})") from None
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in table:
        if qtype not in GGML_QUANT_SIZES:
            raise UserError(f"{path}: tensor {name} has quantization type {qtype.name}, which is not supported")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise UserError(f"{path}: tensor {name} has rows of {dims[:1]} values, not whole {qtype.name} blocks")
        row_bytes, shape = dims[0] // block * block_bytes, tuple(reversed(dims))
        n_bytes = row_bytes * math.prod(dims[1:])
        if start + offset + n_bytes > len(buf):
            raise UserError(f"{path}: tensor {name} extends past the end of the file; the file is truncated")
        data = np.frombuffer(buf, np.uint8, n_bytes, start + offset).reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, qtype, shape, data))
    return GGUFFile(metadata, tensors)


def open_gguf(path: str, dtype: str | None = "float32") -> tuple[ModelConfig, GGUFSource, Tokenizer]:
    """Config, tensor source and tokenizer of a GGUF file; dtype None: the one its matrices are stored in."""
    file = read_gguf(path)
    try:
        cfg = _config(file.metadata, file.tensors, dtype)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    source = GGUFSource(path, file.tensors, cfg.n_heads, cfg.n_kv_heads, cfg.arch, cfg.norm_weight_offset)
    return cfg, source, tokenizer_from_gguf(file.metadata)
