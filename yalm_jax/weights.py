"""The weights pytree, and the one function that builds it from any loader.

Loaders (HF safetensors, GGUF) only expose tensors under transformers' names
and in transformers' layout, as a `TensorSource`. `build_weights` checks every
shape, fuses the projections that are read together, converts to the compute
dtype and places each tensor on the device one at a time, so the host never
holds the whole model twice.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from yalm_jax import parallel
from yalm_jax import quant as _quant
from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    attn_norm: jax.Array  # (dim,)
    wqkv: jax.Array  # (q_dim + 2 * kv_dim, dim): q, k and v rows stacked, read in one pass
    bqkv: jax.Array | None  # (q_dim + 2 * kv_dim,) for Qwen2, else None
    wo: jax.Array  # (dim, q_dim)
    ffn_norm: jax.Array  # (dim,), before the FFN
    # (2 * hidden_dim, dim): gate rows then up rows; with experts (n_experts, 2 * hidden_dim, dim)
    w13: jax.Array
    w2: jax.Array  # (dim, hidden_dim); with experts (n_experts, dim, hidden_dim)
    q_norm: jax.Array | None = None  # (head_dim,) with cfg.qk_norm
    k_norm: jax.Array | None = None  # (head_dim,) with cfg.qk_norm
    attn_post_norm: jax.Array | None = None  # (dim,) with cfg.post_norms, on the attention output
    ffn_post_norm: jax.Array | None = None  # (dim,) with cfg.post_norms, on the FFN output
    router: jax.Array | None = None  # (n_experts, dim) with experts


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    embed: jax.Array  # (vocab, dim)
    layers: list[LayerWeights]
    final_norm: jax.Array  # (dim,)
    lm_head: jax.Array | None  # (vocab, dim); None when tied to `embed`

    @property
    def output(self) -> jax.Array:
        return self.embed if self.lm_head is None else self.lm_head

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))


class TensorSource(Protocol):
    """Tensors under transformers' names, in transformers' layout (out, in)."""

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray: ...


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, str | list[str] | None]:
    """The transformers names behind each LayerWeights field of layer i (lists are stacked)."""
    p = f"model.layers.{i}."
    names = {
        "attn_norm": p + "input_layernorm.weight",
        "wqkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "bqkv": [p + f"self_attn.{x}_proj.bias" for x in "qkv"] if cfg.qkv_bias else None,
        "wo": p + "self_attn.o_proj.weight",
        # Gemma 3's post_attention_layernorm norms the attention output; Llama's is the FFN's input norm.
        "ffn_norm": p + ("pre_feedforward_layernorm.weight" if cfg.post_norms else "post_attention_layernorm.weight"),
        "q_norm": p + "self_attn.q_norm.weight" if cfg.qk_norm else None,
        "k_norm": p + "self_attn.k_norm.weight" if cfg.qk_norm else None,
        "attn_post_norm": p + "post_attention_layernorm.weight" if cfg.post_norms else None,
        "ffn_post_norm": p + "post_feedforward_layernorm.weight" if cfg.post_norms else None,
    }
    if cfg.is_moe:
        # The layout save_pretrained writes (transformers 4.x and 5.x alike): one tensor per expert.
        moe = p + "block_sparse_moe."
        experts = range(cfg.n_experts)
        names["router"] = moe + "gate.weight"
        names["w13"] = [moe + f"experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")]
        names["w2"] = [moe + f"experts.{e}.w2.weight" for e in experts]
    else:
        names["w13"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        names["w2"] = p + "mlp.down_proj.weight"
    return names


_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "attn_post_norm", "ffn_post_norm")


def _model_names(cfg: ModelConfig) -> dict[str, str]:
    """The transformers names behind the Weights fields outside the layers (no lm_head when it is tied)."""
    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
    return names if cfg.tie_embeddings else names | {"lm_head": "lm_head.weight"}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `build_weights` reads, by transformers' name."""
    top = {"embed": (cfg.vocab_size, cfg.dim), "final_norm": (cfg.dim,), "lm_head": (cfg.vocab_size, cfg.dim)}
    shapes = {name: top[field] for field, name in _model_names(cfg).items()}
    field_shapes = {
        "attn_norm": (cfg.dim,),
        "wqkv": None,
        "bqkv": None,
        "wo": (cfg.dim, cfg.q_dim),
        "ffn_norm": (cfg.dim,),
        "q_norm": (cfg.head_dim,),
        "k_norm": (cfg.head_dim,),
        "attn_post_norm": (cfg.dim,),
        "ffn_post_norm": (cfg.dim,),
        "router": (cfg.n_experts, cfg.dim),
        "w13": (cfg.hidden_dim, cfg.dim),
        "w2": (cfg.dim, cfg.hidden_dim),
    }
    for i in range(cfg.n_layers):
        for field, names in _layer_names(cfg, i).items():
            if names is None:
                continue
            if field in ("wqkv", "bqkv"):
                tail = (cfg.dim,) if field == "wqkv" else ()
                for name, rows in zip(names, (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)):
                    shapes[name] = (rows, *tail)
                continue
            for name in [names] if isinstance(names, str) else names:
                shapes[name] = field_shapes[field]
    return shapes


def check_complete(cfg: ModelConfig, source: TensorSource | None) -> None:
    """A UserError naming the first tensor of cfg's model that `source` lacks (None: shapes only)."""
    missing = [n for n in expected_shapes(cfg) if source is not None and not source.has(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing tensor {missing[0]}{more}")


def field_nbytes(
    cfg: ModelConfig, source: TensorSource | None = None, quant: str = "none", int8_activations: bool = False
) -> list[tuple[str, int]]:
    """(field, bytes on the device) for every tensor `build_weights` would place (with these `quant` and
    `int8_activations`), the whole of it (before any split across devices), found from shapes and the source's
    metadata without reading a weight."""
    check_complete(cfg, source)
    shapes = expected_shapes(cfg)
    fields = list(_model_names(cfg).items())
    fields += [(f, n) for i in range(cfg.n_layers) for f, n in _layer_names(cfg, i).items() if n is not None]
    return [
        (field, _quant.loaded_nbytes(quant, field, [names] if isinstance(names, str) else names, shapes, source,
                                    cfg.dtype, is_moe=cfg.is_moe, int8_activations=int8_activations))
        for field, names in fields
    ]  # fmt: skip


def build_weights(
    cfg: ModelConfig, source: TensorSource, progress: bool = False, quant: str | None = None,
    int8_activations: bool = False,
) -> Weights:
    """With cfg.tp > 1 each tensor goes to the devices piece by piece, in parallel.py's layout. `quant` and
    `int8_activations` as load_model takes them; a matrix is marked for int8 activations before it is split,
    while its groups are still the whole model's (quant.with_int8_activations)."""
    parallel.check(cfg, cfg.tp)
    check_complete(cfg, source)
    shapes = expected_shapes(cfg)
    dtype = jnp.dtype(cfg.dtype)

    def read(name: str) -> np.ndarray:
        arr = source.get(name)
        if tuple(arr.shape) != shapes[name]:
            raise UserError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shapes[name]}")
        return arr

    def place(field: str, host):  # an array, or a host quant.QuantizedMatrix
        return jax.device_put(host) if cfg.tp == 1 else parallel.place(cfg, field, host)

    def put(field: str, *names: str, shape: tuple[int, ...] | None = None) -> jax.Array:
        # One staging copy at a time: parts are cast straight into one fused
        # buffer, and jax.device_put (unlike jnp.asarray, which keeps an extra
        # host copy alive on CPU) leaves nothing behind once `host` goes.
        rest = iter(names[1:])
        part = read(names[0])
        if len(names) == 1 and part.dtype == dtype:
            return place(field, part)
        host = _host_empty((sum(shapes[n][0] for n in names), *shapes[names[0]][1:]), dtype)
        start = 0
        while part is not None:
            host[start : start + part.shape[0]] = part
            start += part.shape[0]
            part = read(n) if (n := next(rest, None)) else None
        return place(field, host if shape is None else host.reshape(shape))

    def put_norm(field: str, name: str) -> jax.Array:
        # Gemma's (1 + w) is added once here, in f32 as transformers does, so the model sees plain weights.
        w = read(name).astype(np.float32) + np.float32(cfg.norm_weight_offset)
        return place(field, w.astype(dtype))

    def put_field(field: str, names) -> jax.Array | None:
        if names is None:
            return None
        if quant not in (None, "none"):  # a quant.QuantizedMatrix in place of the dense matrix (quant.py)
            parts = [names] if isinstance(names, str) else names
            qm = _quant.load_field(quant, field, parts, source, read, cfg.dtype, is_moe=cfg.is_moe,
                                   int8_activations=int8_activations)  # fmt: skip
            if qm is not None:
                qm = _quant.with_int8_activations(qm) if int8_activations else qm
                return place(field, _quant.for_device(qm))
        if field in _NORMS:
            return put_norm(field, names)
        if field in ("w13", "w2") and cfg.is_moe:
            rows = 2 * cfg.hidden_dim if field == "w13" else cfg.dim
            return put(field, *names, shape=(cfg.n_experts, rows, shapes[names[0]][1]))
        return put(field, *names) if isinstance(names, list) else put(field, names)

    def put_layer(i: int) -> LayerWeights:
        return LayerWeights(**{f: put_field(f, n) for f, n in _layer_names(cfg, i).items()})

    bar = _progress(cfg.n_layers + 2, enabled=progress)
    top = _model_names(cfg)
    # Tensors are read and converted (GGUF blocks decoded, casts, quantization) on the host by numpy, which
    # lets go of the GIL: a few layers at a time, each staging its own buffers, use the cores the load would
    # leave idle (a 7B IQ4_XS file took 44 s on a 16-core machine in one thread).
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        embed = pool.submit(put_field, "embed", top["embed"])
        lm_head = pool.submit(put_field, "lm_head", top.get("lm_head"))
        layers = []
        for layer in pool.map(put_layer, range(cfg.n_layers)):
            layers.append(layer)
            bar.update()
        weights = Weights(embed=embed.result(), layers=layers, final_norm=put_norm("final_norm", top["final_norm"]),
                          lm_head=lm_head.result())  # fmt: skip
    bar.update(2)
    bar.close()
    return weights


# Layers loaded at once: their staging buffers are what the load holds beyond the weights on the device.
LOAD_THREADS = min(8, os.cpu_count() or 1)


def _host_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A host buffer in its own anonymous mapping: freed straight back to the OS,
    so staging buffers never pile up as heap fragments between device buffers."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes].view(dtype).reshape(shape)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # Quick loads stay silent: tqdm shows the bar only after `delay` seconds.
    return tqdm(total=total, desc="loading", unit="layer", disable=not enabled, delay=1.0, leave=False)
