"""Tensor parallelism: one model spread over the `tp` devices of a 1-D mesh.

Every device runs the same model code, through `jax.shard_map`, on its own
shard: a model with n_heads / tp query heads, n_kv_heads / tp kv heads (or one
kv head shared by tp / n_kv_heads devices when tp > n_kv_heads, as vLLM does)
and hidden_dim / tp FFN rows. `ModelConfig.shard()` describes that per-device
model, so the Pallas kernels run per shard unchanged. Two all-reduces per
layer (`lax.psum` over "tp", after the output and the down projections, in
`ops.linear(..., reduce_axis=...)`) make the sum of the shards' partial
products, before the residual add.

Layout, per device i (the row order each shard's fused kernels expect):
  * wqkv / bqkv rows: [q rows of its heads, k rows of its kv heads, v rows of its kv heads];
  * wo columns: its heads' columns;
  * w13 rows: [gate rows of its hidden slice, up rows of its slice]; w2 columns: its slice.
    Mixtral experts split the same way, every expert's hidden dim across the devices:
    each device holds 1/tp of every expert, so a token's top-k experts cost every
    device the same bytes (with whole experts per device, the device that holds
    both chosen experts reads twice its share while the other idles);
  * embed and lm_head rows: a contiguous 1/tp of the vocabulary when tp divides
    it (the embedding lookup masks and psums; the logits come out vocab-sharded),
    else replicated;
  * norms and the router: replicated;
  * a quant.QuantizedMatrix (int8, int4, fp8, GGUF blocks): its q, scale and min split along the field's
    axis together; a split of columns (wo, w2) keeps whole groups on each device, a row's one scale
    (per-channel formats) repeated for each device's slice of the row; matrices marked for int8
    activations are marked before the split, while their groups are the whole model's.
Each weight is one global `jax.Array` whose NamedSharding splits the shard-major
row (or column) axis, placed piece by piece from the host: no device ever holds
the whole tensor. The KV cache is (tp * n_kv_heads_per_shard, T, head_dim) per
layer, split on its head axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError

AXIS = "tp"

# Which axis of each LayerWeights field is split across the devices (None: replicated).
_ROWS = ("wqkv", "bqkv", "w13")  # axis 0, or 1 for experts' w13
_COLS = ("wo", "w2")  # axis 1, or 2 for experts' w2


@functools.cache
def mesh(tp: int) -> Mesh:
    """The 1-D mesh of the first `tp` devices, axis "tp"."""
    devices = jax.devices()
    if tp > len(devices):
        raise UserError(f"tp={tp} needs {tp} devices but jax sees {len(devices)} ({devices[0].platform})")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def check(cfg: ModelConfig, tp: int) -> None:
    """Raises a UserError when `cfg` cannot be split over `tp` devices."""
    if tp < 1:
        raise UserError(f"tp must be >= 1, got {tp}")
    if tp == 1:
        return
    if cfg.n_heads % tp:
        raise UserError(f"tp={tp} must divide the {cfg.n_heads} attention heads")
    if cfg.n_kv_heads % tp and tp % cfg.n_kv_heads:
        raise UserError(f"tp={tp} must divide the {cfg.n_kv_heads} kv heads, or be a multiple of them")
    if cfg.hidden_dim % tp:
        raise UserError(f"tp={tp} must divide the FFN hidden size {cfg.hidden_dim}")
    mesh(tp)


def vocab_sharded(cfg: ModelConfig) -> bool:
    return cfg.tp > 1 and cfg.vocab_size % cfg.tp == 0


def _axis(cfg: ModelConfig, field: str) -> int | None:
    if field in _ROWS:
        return 1 if cfg.is_moe and field == "w13" else 0
    if field in _COLS:
        return 2 if cfg.is_moe and field == "w2" else 1
    if field in ("embed", "lm_head") and vocab_sharded(cfg):
        return 0
    return None


def spec(cfg: ModelConfig, field: str, ndim: int) -> P:
    axis = _axis(cfg, field)
    return P() if axis is None else P(*[AXIS if a == axis else None for a in range(ndim)])


def field_spec(cfg: ModelConfig, field: str, x):
    """The PartitionSpec of field `field`'s value x; for a quant.QuantizedMatrix, one for each of its arrays
    (q, scale and min split along the same axis: its rows, or its columns in whole groups)."""
    from yalm_jax import quant

    if quant.is_quantized(x):
        s = spec(cfg, field, 2)
        return dataclasses.replace(x, q=s, scale=s, min=None if x.min is None else s)
    return spec(cfg, field, x.ndim)


def weight_specs(cfg: ModelConfig, weights):
    """The PartitionSpec of every leaf of `weights`, as a pytree of the same structure."""
    from yalm_jax.weights import LayerWeights, Weights

    def of(obj, cls):
        return cls(**{
            f: None if (x := getattr(obj, f)) is None else field_spec(cfg, f, x)
            for f in cls.__dataclass_fields__ if f != "layers"
        }, **({"layers": [of(l, LayerWeights) for l in obj.layers]} if cls is Weights else {}))  # fmt: skip

    return of(weights, Weights)


def cache_spec() -> P:
    return P(AXIS, None, None)


def _kv_heads(cfg: ModelConfig, i: int) -> range:
    """The kv heads of shard i: n_kv_heads / tp of them, or the one it shares when tp > n_kv_heads."""
    if cfg.n_kv_heads >= cfg.tp:
        n = cfg.n_kv_heads // cfg.tp
        return range(i * n, (i + 1) * n)
    h = i * cfg.n_kv_heads // cfg.tp
    return range(h, h + 1)


def _piece(cfg: ModelConfig, field: str, host: np.ndarray, i: int) -> np.ndarray:
    """Shard i's part of `host`, a whole tensor in the single-device layout (see weights.LayerWeights)."""
    tp = cfg.tp
    if field in ("wqkv", "bqkv"):
        hd, qs = cfg.head_dim, cfg.q_dim // tp
        kv = _kv_heads(cfg, i)
        k0, k1 = cfg.q_dim + kv.start * hd, cfg.q_dim + kv.stop * hd
        return np.concatenate([
            host[i * qs : (i + 1) * qs], host[k0:k1], host[k0 + cfg.kv_dim : k1 + cfg.kv_dim]
        ])  # fmt: skip
    axis = _axis(cfg, field)
    n = host.shape[axis]
    if field == "w13":  # gate rows then up rows, each split
        h, hs = n // 2, n // 2 // tp
        gate = np.take(host, np.arange(i * hs, (i + 1) * hs), axis=axis)
        up = np.take(host, np.arange(h + i * hs, h + (i + 1) * hs), axis=axis)
        return np.concatenate([gate, up], axis=axis)
    s = n // tp
    return np.take(host, np.arange(i * s, (i + 1) * s), axis=axis)


def _splittable(cfg: ModelConfig, field: str, w):
    """A host quant.QuantizedMatrix w in a form whose arrays split along K with whole groups on every device:
    one scale a row becomes one a device's slice of the row (the same scale, repeated)."""
    if _axis(cfg, field) != 1:
        return w
    k, local = w.shape[1], w.shape[1] // cfg.tp
    if w.group == k:
        return dataclasses.replace(w, scale=np.tile(np.asarray(w.scale), (1, cfg.tp)), group=local)
    if local % w.group:
        raise UserError(f"tp={cfg.tp} would split {field}'s groups of {w.group} columns (its rows have {k})")
    return w


def place(cfg: ModelConfig, field: str, host):
    """Puts a whole host tensor (or quant.QuantizedMatrix) on the mesh: each device gets only its piece (or a
    copy, if replicated)."""
    from yalm_jax import quant

    if quant.is_quantized(host):
        w = _splittable(cfg, field, host)
        arrays = {name: place(cfg, field, np.asarray(a)) for name in ("q", "scale", "min")
                  if (a := getattr(w, name)) is not None}  # fmt: skip
        return dataclasses.replace(w, **arrays)
    m = mesh(cfg.tp)
    sharding = NamedSharding(m, spec(cfg, field, host.ndim))
    axis = _axis(cfg, field)
    if axis is None:
        return jax.device_put(host, sharding)
    devices = list(m.devices.flat)
    pieces = [jax.device_put(_piece(cfg, field, host, i), d) for i, d in enumerate(devices)]
    shape = list(pieces[0].shape)
    shape[axis] *= cfg.tp
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, pieces)


def cache_heads(cfg: ModelConfig) -> int:
    """Heads of each layer's global KV cache: n_kv_heads, or tp when the kv heads are replicated."""
    return max(cfg.n_kv_heads, cfg.tp)


def cache_sharding(cfg: ModelConfig) -> NamedSharding:
    return NamedSharding(mesh(cfg.tp), cache_spec())


def per_device_bytes(tree) -> dict:
    """Bytes each device holds of the arrays in `tree`, by device."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def weight_bytes_per_device(cfg: ModelConfig, field_nbytes: list[tuple[str, int]], tp: int | None = None) -> int:
    """Bytes of weights each device holds at tensor parallelism `tp` (default cfg.tp), from
    weights.field_nbytes: each split field's 1/tp, each replicated one whole."""
    tp = tp or cfg.tp
    split = dataclasses.replace(cfg, tp=tp)
    return sum(n // tp if _axis(split, field) is not None else n for field, n in field_nbytes)


def check_fits(cfg: ModelConfig, field_nbytes: list[tuple[str, int]], limit: int | None = None,
               alternatives: list[tuple[str, Callable[[], list[tuple[str, int]]]]] = ()) -> None:  # fmt: skip
    """A UserError, suggesting --tp, when the weights (weights.field_nbytes: in the form they load in, quantized
    or not) exceed what the device lets XLA allocate (`limit`, by default the device's
    memory_stats()["bytes_limit"]; jax reports none on the CPU). `alternatives`: (flag, a function giving its
    field_nbytes) of other ways to load the same model (a GGUF file's blocks kept: --quant=native), named first
    where they fit; sized only when the weights do not fit."""
    device = mesh(cfg.tp).devices.flat[0]
    if limit is None:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        limit = (stats or {}).get("bytes_limit")
    need = weight_bytes_per_device(cfg, field_nbytes)
    if not limit or need <= limit:
        return
    n = len(jax.devices())
    fits = [t for t in range(cfg.tp + 1, n + 1) if weight_bytes_per_device(cfg, field_nbytes, t) <= limit]
    fit = next((t for t in fits if not _check_quiet(cfg, t)), None)
    hint = f"try --tp={fit}" if fit else f"--tp=N spreads it over N devices (this host has {n})"
    for flag, alt in alternatives:
        if (alt_need := weight_bytes_per_device(cfg, alt())) <= limit:
            hint = f"{flag} loads it in {alt_need / 1e9:.1f} GB per device, or {hint}"
            break
    raise UserError(
        f"the weights need {need / 1e9:.1f} GB per device{f' at tp={cfg.tp}' if cfg.tp > 1 else ''}, "
        f"but {device.device_kind} lets XLA allocate {limit / 1e9:.1f} GB; {hint}"
    )


def _check_quiet(cfg: ModelConfig, tp: int) -> str | None:
    try:
        check(dataclasses.replace(cfg, tp=tp), tp)
    except UserError as e:
        return str(e)
    return None
