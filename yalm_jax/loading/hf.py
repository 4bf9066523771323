"""Transformers model directories: config.json plus one or many safetensors files.

Tensors are read with plain file reads into fresh arrays, one at a time, in the
dtype the file stores (bf16 through ml_dtypes). Nothing is memory-mapped, so a
tensor's bytes are resident only while `build_weights` converts and places it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re

import ml_dtypes
import numpy as np

from yalm_jax.config import ModelConfig, config_from_hf
from yalm_jax.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


def load_hf_config(model_dir: str, dtype: str | None) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json; expected a transformers model directory or a .gguf file")
    return config_from_hf(read_json(path), dtype)


class _TensorInfo:
    __slots__ = ("kind", "shape", "start", "nbytes")

    def __init__(self, kind: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.kind, self.shape, self.start, self.nbytes = kind, shape, start, nbytes


def _read_header(path: str) -> dict[str, _TensorInfo]:
    """Parses and checks a safetensors header against the file's real size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise UserError(f"{path}: not a safetensors file, or truncated (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header")
    data_start = 8 + n
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            kind = str(meta["dtype"])
            shape = tuple(int(x) for x in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        dtype = _DTYPES.get(kind)
        if begin < 0 or end < begin or (dtype is not None and end - begin != math.prod(shape) * dtype.itemsize):
            raise UserError(f"{path}: corrupt safetensors header: tensor {name} has inconsistent offsets")
        if data_start + end > size:
            raise UserError(f"{path}: truncated: tensor {name} needs {data_start + end} bytes but the file has {size}")
        infos[name] = _TensorInfo(kind, shape, data_start + begin, end - begin)
    return infos


class SafetensorsSource:
    """Reads tensors lazily, one at a time, from a model's safetensors file(s)."""

    def __init__(self, model_dir: str, quantization: dict | None = None):
        # A checkpoint from scripts/quantize.py: config.json's "quantization" names each quantized matrix,
        # stored as <name>.q, <name>.scale (and <name>.min); see yalm_jax/quant.py.
        self._quant = dict((quantization or {}).get("tensors", {}))
        self.quantized = bool(self._quant)
        index_path = os.path.join(model_dir, INDEX)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index_path}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(model_dir, SINGLE)):
            files = [SINGLE]
        else:
            raise UserError(f"{model_dir}: no {SINGLE} or {INDEX}")
        self._where: dict[str, tuple[str, _TensorInfo]] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: shard listed in {INDEX} is missing")
            for key, info in _read_header(path).items():
                self._where[key] = (path, info)
        _alias_fused_experts(self._where)

    def keys(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where or name in self._quant

    def get_quantized(self, name: str, dtype: str = "float32"):
        """A stored quantized matrix as a host quant.QuantizedMatrix, or None for a dense tensor."""
        from yalm_jax import quant

        spec = self._quant.get(name)
        return None if spec is None else quant.from_stored(spec, lambda part: self.get(f"{name}.{part}"), dtype)

    def quantized_form(self, name: str):
        """The quant.StoredForm of `get_quantized(name)`'s matrix (its stored parts), without reading it; or None."""
        from yalm_jax import quant

        spec = self._quant.get(name)
        if spec is None:
            return None
        parts = [self._where.get(f"{name}.{part}") for part in ("q", "scale", "min")]
        nbytes = sum(info.nbytes for _, info in filter(None, parts))
        return quant.StoredForm(spec.get("format"), spec.get("group"), bool(spec.get("min")), nbytes)

    def get(self, name: str) -> np.ndarray:
        """A fresh array (not a view of the file) in the dtype the file stores; a quantized matrix dequantized to f32."""
        if name in self._quant:
            return np.asarray(self.get_quantized(name).dequantize(np.float32))
        path, info = self._where[name]
        dtype = _DTYPES.get(info.kind)
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.kind}")
        # An anonymous mapping, not malloc: its pages go back to the OS as soon as
        # the array dies, instead of fragmenting the heap between device buffers.
        buf = np.frombuffer(mmap.mmap(-1, max(info.nbytes, 1)), np.uint8)[: info.nbytes]
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise UserError(f"{path}: truncated while reading tensor {name}")
                done += got
        return buf.view(dtype).reshape(info.shape)


_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def _alias_fused_experts(where: dict) -> None:
    """Names transformers 5.x's fused expert tensors the way save_pretrained writes them (one tensor per
    expert): mlp.experts.gate_up_proj (E, 2H, D) holds each expert's w1 then w3 rows, mlp.experts.down_proj
    (E, D, H) each expert's w2, and mlp.gate is block_sparse_moe.gate. Each alias is a byte range of the file."""
    for key, (path, info) in list(where.items()):
        m = _FUSED_EXPERTS.match(key)
        if not m or len(info.shape) != 3 or info.kind not in _DTYPES:
            continue
        prefix, which = m.groups()
        n_experts, rows, cols = info.shape
        per_expert = info.nbytes // n_experts
        parts = [("w1", 0, rows // 2), ("w3", per_expert // 2, rows // 2)] if which == "gate_up_proj" else [("w2", 0, rows)]
        for e in range(n_experts):
            for w, offset, n in parts:
                alias = _TensorInfo(info.kind, (n, cols), info.start + e * per_expert + offset, per_expert * n // rows)
                where.setdefault(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight", (path, alias))
        gate = prefix + "mlp.gate.weight"
        if gate in where:
            where.setdefault(prefix + "block_sparse_moe.gate.weight", where[gate])


def open_hf_dir(model_dir: str, dtype: str | None = "float32"):
    """Config, tensor source and tokenizer of a transformers model directory; dtype None: the one config.json
    says the weights are stored in (float32 where it names none)."""
    from yalm_jax.tokenizer import tokenizer_from_hf_dir

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such directory")
    cfg = load_hf_config(model_dir, dtype)
    source = SafetensorsSource(model_dir, read_json(os.path.join(model_dir, "config.json")).get("quantization"))
    return cfg, source, tokenizer_from_hf_dir(model_dir)
