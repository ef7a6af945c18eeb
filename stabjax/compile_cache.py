"""JAX's persistent compilation cache, shared by every run on a machine.

A small model's first train step is mostly compilation (XLA), and each run of a sweep
compiles the same step again. With the cache on, a run whose step has the same HLO as an
earlier run's (same shapes, same settings baked into the step) loads the executable from
disk instead of compiling it. Executables are keyed by a hash of the HLO, the JAX/XLA
version and the compile options, so a stale entry is never used for another program.
"""

from __future__ import annotations

import os
import warnings

import jax

DEFAULT_DIR = "~/.cache/stabjax/jax_compilation_cache"
# Cache only what took at least this long to compile: the train, eval and generation
# steps, not the many tiny jitted helpers (whose files would cost more than they save).
# JAX's own variable, where set, wins (0 caches every program).
MIN_COMPILE_SECONDS = 0.5
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def enable(directory: str | None) -> str | None:
  """Turn the cache on in `directory` ('~' expanded; a gs:// path is passed to JAX as is);
  None or '' leaves it off. Returns the directory used. Call before the first jit."""
  if not directory:
    return None
  path = directory if "://" in directory else os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get(MIN_COMPILE_ENV, MIN_COMPILE_SECONDS)))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # An entry that cannot be written (a full disk), or one left truncated, only costs a
  # compile: the run goes on, and the launcher's one-line errors stay one line.
  warnings.filterwarnings("ignore",
                          message="Error (reading|writing) persistent compilation cache entry")
  return path
