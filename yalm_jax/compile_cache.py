"""JAX's persistent compilation cache, on by default.

A second run of the same model and shapes loads its XLA executables from disk
instead of compiling them again. The cache lives in
`$XDG_CACHE_HOME/yalm_jax/xla` (default `~/.cache/yalm_jax/xla`). Set
`YALM_JAX_COMPILE_CACHE` to another directory to move it, or to `0`/`off` to
turn it off.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "YALM_JAX_COMPILE_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "yalm_jax", "xla")


def enable(path: str | None = None) -> str | None:
    """Turns the cache on in `path` (default: $YALM_JAX_COMPILE_CACHE, else `default_dir()`).

    Returns the directory in use, or None when the cache is off or its directory
    cannot be created (caching is an optimisation; it never stops a run).
    """
    if path is None:
        env = os.environ.get(ENV_VAR)
        if env is not None and env.strip().lower() in _OFF:
            return None
        path = env or default_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program, however quick to compile or small: a decode chunk is both.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def disable() -> None:
    jax.config.update("jax_compilation_cache_dir", None)
