"""Orbax checkpoints of the train state and the data iterator's position (SPEC section 7).

Each checkpoint holds two items: 'state' (params, optimizer and PSU state, step, key; saved
sharded, asynchronously) and 'data' (the input pipeline's position as JSON), so a resumed
run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin `ocp.CheckpointManager` wrapper: save / restore latest / preemption."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

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
    self._manager.wait_until_finished()
    self._manager.close()


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
