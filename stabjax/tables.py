"""Markdown, CSV and JSON writers of the sweeps' results.

Kept apart from the sweep and the plots so that a table can be written (and tested)
without training or matplotlib; every cell goes through one formatter.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def fmt(v: Any, digits: int = 4) -> str:
  """Numbers with `digits` significant digits; None/nan as an em dash."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "—"
  if isinstance(v, bool) or isinstance(v, (int, np.integer)):
    return str(v)
  if isinstance(v, (float, np.floating)):
    return f"{float(v):.{digits}g}"
  return str(v)


def fmt_percent(v: float | None, digits: int = 1) -> str:
  """A share in [0, 1] as a percentage with `digits` decimals, as in the paper's Table 1."""
  if v is None or math.isnan(v):
    return "—"
  return f"{100.0 * v:.{digits}f}%"


def fmt_mean_std(stat: tuple[float, float] | None, digits: int = 4, percent: bool = False) -> str:
  """'mean ± std' (std omitted when nan, i.e. a single seed)."""
  if stat is None:
    return "—"
  mean, std = stat
  f = (lambda x: fmt_percent(x)) if percent else (lambda x: fmt(x, digits))
  return f(mean) if math.isnan(std) else f"{f(mean)} ± {f(std)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells that are not strings go through `fmt`; '|' is escaped."""
  cell = lambda c: (c if isinstance(c, str) else fmt(c)).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f"row has {len(row)} cells, header {len(header)}")
    lines.append("| " + " | ".join(cell(c) for c in row) + " |")
  return "\n".join(lines)


def write_csv(path: str, records: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> None:
  """One row per record; `columns` default to the union of keys in first-seen order."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in records for k in r))
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(columns)
    for r in records:
      w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                  for c in columns])


def write_json(path: str, obj: Any) -> None:
  """Pretty JSON; tuples become lists and nan becomes null (strict JSON)."""
  def clean(x):
    if isinstance(x, Mapping):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
      return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
      return int(x)
    return x
  with open(path, "w") as f:
    json.dump(clean(obj), f, indent=2, allow_nan=False)
    f.write("\n")


def wall_time_note(records: Sequence[Mapping[str, Any]], elapsed_s: float) -> str:
  """'runs took X min in all (...); this invocation Y min' for a sweep's markdown."""
  walls = [r["wall_s"] for r in records if r.get("wall_s") is not None]
  return (f"the runs took {sum(walls) / 60:.1f} min of wall time in all (each from its "
          f"config.json to its summary.json; a resumed run counts its last session only); "
          f"this invocation took {elapsed_s / 60:.1f} min (reused runs cost nothing).")


def _cell_text(text: str) -> str:
  """One markdown table cell of free text: newlines as <br> ('|' is escaped by the table);
  an empty generation (EOS at once) shows as '(empty)'."""
  return text.replace("\r\n", "\n").replace("\n", "<br>") if text else "(empty)"


def side_by_side_samples(columns: Mapping[str, Mapping[str, Sequence[str]]],
                         decoders: Sequence[str] = ("sample", "greedy"), n: int = 5) -> str:
  """The first `n` generations of several runs next to each other, as markdown.

  `columns` maps a column label (e.g. 'α=0') to a run's parsed samples.txt ({section:
  texts}, `stabjax.degeneration.parse_samples`); the runs must continue the same prompts
  in the same order (one seed, several alphas). Per prompt: a heading with the prompt
  (from the first run that has a 'prompts' section; else just 'Prompt i'), then a table with
  one row per decoder and one column per label. A decoder no run has is left out; a
  missing generation is an em dash.
  """
  from stabjax.sweep import DECODER_TITLES

  runs = list(columns.values())
  decoders = [d for d in decoders if any(d in r for r in runs)]
  prompts = next((list(r["prompts"]) for r in runs if r.get("prompts")), [])
  count = max([len(r.get(d, ())) for r in runs for d in decoders] + [len(prompts)], default=0)
  parts = []
  for i in range(min(n, count)):
    heading = f"Prompt {i + 1}"
    if i < len(prompts):
      heading += f': "{" ".join(prompts[i].split())}"'  # one line
    rows = [[DECODER_TITLES.get(d, d)]
            + [_cell_text(r[d][i]) if i < len(r.get(d, ())) else "—" for r in runs]
            for d in decoders]
    parts += [f"### {heading}", "", markdown_table(["decoder"] + list(columns), rows), ""]
  return "\n".join(parts)
