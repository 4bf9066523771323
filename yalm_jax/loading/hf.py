"""Transformers model directories: config.json plus one or many safetensors files."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

from yalm_jax.config import ModelConfig, config_from_hf
from yalm_jax.errors import UserError

INDEX = "model.safetensors.index.json"


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_hf_config(model_dir: str, dtype: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json; expected a transformers model directory or a .gguf file")
    return config_from_hf(read_json(path), dtype)


class SafetensorsSource:
    """Reads tensors lazily, one at a time, from a model's safetensors file(s)."""

    def __init__(self, model_dir: str):
        index_path = os.path.join(model_dir, INDEX)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise UserError(f"{model_dir}: no model.safetensors or {INDEX}")
        self._file_of: dict[str, str] = {}
        self._handles = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{path}: shard listed in {INDEX} is missing")
            try:
                handle = safe_open(path, framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[path] = handle
            for key in handle.keys():
                self._file_of[key] = path

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: tensor {name} cannot be read; the file may be truncated ({e})") from None
