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
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    attn_norm: jax.Array  # (dim,)
    wqkv: jax.Array  # (q_dim + 2 * kv_dim, dim): q, k and v rows stacked, read in one pass
    bqkv: jax.Array | None  # (q_dim + 2 * kv_dim,) for Qwen2, else None
    wo: jax.Array  # (dim, q_dim)
    ffn_norm: jax.Array  # (dim,)
    w13: jax.Array  # (2 * hidden_dim, dim): gate rows then up rows
    w2: jax.Array  # (dim, hidden_dim)


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


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `build_weights` reads, by transformers' name."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim), "model.norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (cfg.dim,)
        shapes[p + "post_attention_layernorm.weight"] = (cfg.dim,)
        for proj, rows in (("q", cfg.q_dim), ("k", cfg.kv_dim), ("v", cfg.kv_dim)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (rows, cfg.dim)
            if cfg.qkv_bias:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (cfg.dim, cfg.q_dim)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.hidden_dim, cfg.dim)
        shapes[p + "mlp.up_proj.weight"] = (cfg.hidden_dim, cfg.dim)
        shapes[p + "mlp.down_proj.weight"] = (cfg.dim, cfg.hidden_dim)
    return shapes


def build_weights(cfg: ModelConfig, source: TensorSource, progress: bool = False) -> Weights:
    shapes = expected_shapes(cfg)
    missing = [n for n in shapes if not source.has(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing tensor {missing[0]}{more}")
    dtype = jnp.dtype(cfg.dtype)

    def read(name: str) -> np.ndarray:
        arr = source.get(name)
        if tuple(arr.shape) != shapes[name]:
            raise UserError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shapes[name]}")
        return arr

    def put(*names: str) -> jax.Array:
        # One staging copy at a time: parts are cast straight into one fused
        # buffer, and jax.device_put (unlike jnp.asarray, which keeps an extra
        # host copy alive on CPU) leaves nothing behind once `host` goes.
        rest = iter(names[1:])
        part = read(names[0])
        if len(names) == 1 and part.dtype == dtype:
            return jax.device_put(part)
        host = _host_empty((sum(shapes[n][0] for n in names), *shapes[names[0]][1:]), dtype)
        start = 0
        while part is not None:
            host[start : start + part.shape[0]] = part
            start += part.shape[0]
            part = read(n) if (n := next(rest, None)) else None
        return jax.device_put(host)

    bar = _progress(cfg.n_layers + 2, enabled=progress)
    embed = put("model.embed_tokens.weight")
    bar.update()
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
        layers.append(
            LayerWeights(
                attn_norm=put(p + "input_layernorm.weight"),
                wqkv=put(*(a + ".weight" for a in attn)),
                bqkv=put(*(a + ".bias" for a in attn)) if cfg.qkv_bias else None,
                wo=put(p + "self_attn.o_proj.weight"),
                ffn_norm=put(p + "post_attention_layernorm.weight"),
                w13=put(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                w2=put(p + "mlp.down_proj.weight"),
            )
        )
        bar.update()
    weights = Weights(
        embed=embed,
        layers=layers,
        final_norm=put("model.norm.weight"),
        lm_head=None if cfg.tie_embeddings else put("lm_head.weight"),
    )
    bar.update()
    bar.close()
    return weights


def _host_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A host buffer in its own anonymous mapping: freed straight back to the OS,
    so staging buffers never pile up as heap fragments between device buffers."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes].view(dtype).reshape(shape)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # Quick loads stay silent: tqdm shows the bar only after `delay` seconds.
    return tqdm(total=total, desc="loading", unit="layer", disable=not enabled, delay=1.0, leave=False)
