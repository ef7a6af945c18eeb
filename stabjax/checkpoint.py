"""Orbax checkpoints of the train state and the data iterator's position (SPEC section 7).

Each checkpoint holds two items: 'state' (params, optimizer and PSU state, step, key; saved
sharded, asynchronously) and 'data' (the input pipeline's position as JSON), so a resumed
run sees exactly the batches it would have seen. `restore_latest_intact` falls back past
a corrupt or partial newest checkpoint, moving it aside rather than deleting it.

The directory may be a cloud path (gs://): it reaches orbax unchanged. With several
processes every one calls save and restore (orbax coordinates them); process 0 alone moves
a corrupt checkpoint aside while the others wait at a barrier.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from stabjax import paths


class CheckpointError(RuntimeError):
  """No intact checkpoint to resume from, or one could not be written; one line."""


class _QuietFailedWrites(logging.Filter):
  """While a Checkpointer is open: drop orbax's own ERROR records (a failed async write
  logs its traceback from the writer threads; the failure reaches `save`/`close` as an
  exception, which becomes one CheckpointError line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _closed_loop(kind, value) -> bool:
  return kind is RuntimeError and str(value) == "Event loop is closed"


def _unraisablehook_without_closed_loops(previous):
  """sys.unraisablehook that skips tensorstore's 'Event loop is closed': its write
  callbacks still fire after orbax closed the event loop of a failed save, one per
  pending write."""
  def hook(unraisable):
    if not _closed_loop(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)
  hook.stabjax_quiet = True
  return hook


_QUIET = _QuietFailedWrites()


def _quiet_orbax() -> None:
  logging.getLogger("absl").addFilter(_QUIET)
  # A save that fails before its coroutines start (a read-only directory) leaves them
  # unawaited; Python would warn about each at exit, after the one-line error.
  warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  if not getattr(sys.unraisablehook, "stabjax_quiet", False):
    sys.unraisablehook = _unraisablehook_without_closed_loops(sys.unraisablehook)


class Checkpointer:
  """A thin `ocp.CheckpointManager` wrapper: save / restore latest / preemption."""

  def __init__(self, directory, keep: int = 3):
    self.directory = str(paths.absolute(directory))
    self._keep = keep
    _quiet_orbax()
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest_intact(self, abstract_state: Any, shardings: Any,
                            warn: Callable[[str], None] = print
                            ) -> tuple[int | None, Any, dict | None]:
    """(step, state, data_state) of the newest checkpoint that restores; (None, None, None)
    when there is none at all.

    A checkpoint that fails to restore (truncated, partial, unreadable) is moved to
    `<directory>_corrupt/<step>` with a one-line `warn`, and the next older one is tried;
    CheckpointError when every one fails.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        state, data = self.restore(step, abstract_state, shardings)
        return step, state, data
      except Exception as e:  # orbax raises many types for a damaged checkpoint
        aside = self._move_aside(step)
        warn(f"warning: checkpoint step {step} in {self.directory} does not restore "
             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); moved "
             f"to {aside}; trying the one before")
    if steps:
      raise CheckpointError(f"no intact checkpoint in {self.directory} (steps "
                            f"{', '.join(map(str, steps))} moved to {self.directory}_corrupt); "
                            f"start a new --workdir or restore them by hand")
    return None, None, None

  def _move_aside(self, step: int) -> str:
    aside_root = epath.Path(self.directory + "_corrupt")
    target, n = aside_root / str(step), 1
    while target.exists():
      target, n = aside_root / f"{step}.{n}", n + 1
    self._manager.close()
    if jax.process_index() == 0:
      aside_root.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:  # the others must not list the step before it moved
      multihost_utils.sync_global_devices(f"stabjax_move_aside_{step}")
    self._manager = self._open()  # forget the moved step
    return str(target)

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Saves asynchronously; CheckpointError (one line) when this or the previous save
    could not be written (read-only or full disk); the last completed checkpoint stays."""
    try:
      self._probe_writable()
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:
      raise self._write_error(e) from None

  def _probe_writable(self) -> None:
    """Create and remove an empty file first (local directories): orbax creates a step's
    directory in a background thread, and a read-only one could leave the save hanging."""
    if not paths.is_local(self.directory):
      return
    probe = epath.Path(self.directory) / f".write-probe-{jax.process_index()}-{os.getpid()}"
    probe.write_text("")
    probe.unlink()

  def restore(self, step: int, abstract_state: Any = None, shardings: Any = None
              ) -> tuple[Any, dict]:
    """Restore into arrays with the given shardings (no host copy of the whole state).

    Without `abstract_state`, the state comes back as saved (a tree of arrays), for
    inspection.
    """
    target = None
    if abstract_state is not None:
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            abstract_state, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def reached_preemption(self, step: int) -> bool:
    """Multi-host preemption notice (jax.distributed), or SIGTERM seen by this process."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from None
    finally:
      self._manager.close()

  def _write_error(self, e: Exception) -> CheckpointError:
    last = self._manager.latest_step()
    return CheckpointError(
        f"cannot write a checkpoint to {self.directory} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:160] if str(e) else ''}); the last complete checkpoint is "
        f"step {last}; free disk space or fix permissions, then run the same command again")


class SigtermFlag:
  """Set when the process receives SIGTERM (a preempted VM), so the loop can save and exit."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def __bool__(self) -> bool:
    return self._event.is_set()
