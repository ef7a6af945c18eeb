"""Shared test setup: tests run on the CPU with float32 matmuls at full precision."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The launchers the tests start share one persistent compilation cache (they read this
# variable), so the many small runs of one config compile their steps once per session.
os.environ.setdefault("STABJAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"stabjax-tests-jax-cache-{os.getuid()}"))

import jax  # noqa: E402

from stabjax import compile_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The tests' own steps use it too: many build the same tiny trainer and compile it again.
compile_cache.enable(os.environ["STABJAX_COMPILATION_CACHE_DIR"])
