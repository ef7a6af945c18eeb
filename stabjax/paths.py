"""Workdir, cache and data paths, local or in the cloud (gs://, s3://), through `etils.epath`.

A cloud path must reach orbax, TFDS and the writers unchanged: `os.path.abspath` would
turn 'gs://b/run' into '/cwd/gs:/b/run' and a plain `open` would create that local folder.
"""

from __future__ import annotations

import os
import re

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path) -> bool:
  """Whether `path` is on this machine's file system (no 'scheme://' prefix)."""
  return not _URI.match(os.fspath(path))


def absolute(path) -> epath.Path:
  """A local path with '~' and $VARS expanded, made absolute; a cloud path unchanged."""
  path = os.fspath(path)
  if not is_local(path):
    return epath.Path(path)
  return epath.Path(os.path.expandvars(path)).expanduser().resolve()
