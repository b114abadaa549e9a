"""A persistent compilation cache: compile each decode-loop shape once per machine, not once per process.

The compiled decode loop (XLA on TensorFlow for float32, `jax.jit` on JAX) is
the slow part of a cold start. With the cache on, a compiled executable is
written to a directory and the next process that compiles the same program
loads it instead:

- JAX: `jax_compilation_cache_dir` (JAX's own persistent cache), set when the
  Generator first compiles.
- TensorFlow: XLA's `--tf_xla_persistent_cache_directory` (in `TF_XLA_FLAGS`).
  TensorFlow reads these flags once, when it is imported, so `enable()` must
  run before `import tensorflow`; the CLI does this before anything else.
  The graph-mode loop (bfloat16/float16 on CPU) has only its token selection
  XLA-compiled, so it gains less. XLA's CPU loader (TF 2.21) logs an ERROR
  line on every cache hit, comparing its own tuning features
  (`+prefer-no-scatter`) with the host's instruction sets; it is harmless,
  and the CLI hides C++ logs below level 3 when the cache is on.

The default directory is `$XDG_CACHE_HOME/pitchkeras/compile` (else
`~/.cache/pitchkeras/compile`); `PITCHKERAS_COMPILE_CACHE=off` turns the default
off and any other value of it replaces the directory. Entries are keyed by the
compiled program (shapes, dtypes, the library versions), so a stale entry is
never used for a different program; deleting the directory is always safe.

Example:

>>> from pitchkeras import compile_cache
>>> compile_cache.enable()  # before TensorFlow is imported
'/home/me/.cache/pitchkeras/compile'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from pitchkeras.errors import InvalidArgument

ENV_VAR = "PITCHKERAS_COMPILE_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
_TF_FLAG = "--tf_xla_persistent_cache_directory"

_directory: Optional[str] = None  # what enable() chose; the JAX side applies it at first compile


def default_directory() -> Optional[str]:
    """The cache directory used when none is given, or None when `PITCHKERAS_COMPILE_CACHE=off`."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES or not value.strip() else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "pitchkeras", "compile")


def enable(directory: Optional[str] = "default") -> Optional[str]:
    """Turn the persistent compilation cache on for this process.

    Args:
        directory: str or None. Where compiled programs are kept; "default"
            picks `default_directory()`; None leaves the cache off.

    Returns:
        The directory in use, or None when the cache stays off (switched off,
        or TensorFlow was imported before this call, so its XLA flags are
        already read).
    """
    global _directory
    if directory == "default":
        directory = default_directory()
    if directory is None:
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise InvalidArgument(f"compile cache directory {directory}: {err.strerror or err}; "
                              f"give a writable directory or switch the cache off") from None
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if _TF_FLAG not in flags:
        if "tensorflow" in sys.modules:
            return None  # too late for TensorFlow; a JAX process never imports it before this
        os.environ["TF_XLA_FLAGS"] = f"{flags} {_TF_FLAG}={directory}".strip()
    _directory = directory
    if "jax" in sys.modules:
        apply_to_jax()
    return directory


def directory_in_use() -> Optional[str]:
    """The directory `enable()` turned on, or None."""
    return _directory


def apply_to_jax() -> None:
    """Point JAX's persistent cache at the enabled directory (no-op when the cache is off)."""
    if _directory is None:
        return
    import jax

    if jax.config.jax_compilation_cache_dir != _directory:
        jax.config.update("jax_compilation_cache_dir", _directory)
        # Cache every compiled loop: even a tiny model's is worth a file read.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
