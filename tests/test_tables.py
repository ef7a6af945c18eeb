"""stabjax.tables: markdown, CSV and JSON writers and the side-by-side samples, exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stabjax import tables


def test_markdown_table_exact():
  got = tables.markdown_table(["model", "α=0", "n"], [["gpt2", 0.123456, 3], ["bert", None, "x"]])
  assert got == ("| model | α=0 | n |\n|---|---|---|\n| gpt2 | 0.1235 | 3 |\n"
                 "| bert | — | x |")
  assert tables.markdown_table(["d(p||q)"], [["a|b"]]) == "| d(p\\|\\|q) |\n|---|\n| a\\|b |"
  with pytest.raises(ValueError, match="2 cells, header 3"):
    tables.markdown_table(["a", "b", "c"], [[1, 2]])


def test_formatting():
  assert tables.fmt(1234.5678) == "1235"
  assert tables.fmt(float("nan")) == "—"
  assert tables.fmt(True) == "True"
  assert tables.fmt(np.int64(7)) == "7"
  assert tables.fmt_percent(0.675) == "67.5%"
  assert tables.fmt_percent(1.0) == "100.0%"
  assert tables.fmt_percent(None) == "—"
  assert tables.fmt_mean_std((0.25, 0.0125), percent=True) == "25.0% ± 1.2%"
  assert tables.fmt_mean_std((2.0, math.nan)) == "2"
  assert tables.fmt_mean_std((3.14159, 0.5), digits=3) == "3.14 ± 0.5"
  assert tables.fmt_mean_std(None) == "—"


def test_write_csv_and_json(tmp_path):
  recs = [{"model": "gpt2", "alpha": 0.05, "hf": 0.5}, {"model": "bert", "alpha": 0.2, "x": 3}]
  path = tmp_path / "t.csv"
  tables.write_csv(str(path), recs)
  assert path.read_text() == "model,alpha,hf,x\ngpt2,0.05,0.5,\nbert,0.2,,3\n"
  jpath = tmp_path / "t.json"
  tables.write_json(str(jpath), {"a": (1.5, float("nan")), "b": np.float32(0.25),
                                 "c": np.int64(3), 4: [float("inf")]})
  assert json.loads(jpath.read_text()) == {"a": [1.5, None], "b": 0.25, "c": 3, "4": [None]}


def test_wall_time_note():
  note = tables.wall_time_note([{"wall_s": 60.0}, {"wall_s": None}, {"wall_s": 120.0}], 30.0)
  assert note.startswith("the runs took 3.0 min of wall time in all")
  assert "this invocation took 0.5 min" in note


def test_side_by_side_samples_exact():
  a0 = {"prompts": ["The cat\nsat", "A | B", "Third"],
        "sample": ["s0 a0", "s1 | a0", "s2 a0"], "greedy": ["g0 a0", "g1\na0", "g2 a0"],
        "top_k": ["k0", "k1", "k2"]}
  a2 = {"prompts": a0["prompts"], "sample": ["s0 a2", "s1 a2"], "greedy": ["g0 a2", "g1 a2"]}
  got = tables.side_by_side_samples({"α=0": a0, "α=0.2": a2}, n=2)
  assert got == "\n".join([
      '### Prompt 1: "The cat sat"', "",
      "| decoder | α=0 | α=0.2 |", "|---|---|---|",
      "| sampling | s0 a0 | s0 a2 |",
      "| greedy | g0 a0 | g0 a2 |", "",
      '### Prompt 2: "A | B"', "",
      "| decoder | α=0 | α=0.2 |", "|---|---|---|",
      "| sampling | s1 \\| a0 | s1 a2 |",
      "| greedy | g1<br>a0 | g1 a2 |", ""])
  # n beyond the generations: a missing one is an em dash; an absent decoder is left out.
  got = tables.side_by_side_samples({"α=0": a0, "α=0.2": a2},
                                    decoders=("sample", "nucleus"), n=10)
  assert got.count("### ") == 3
  assert "| sampling | s2 a0 | — |" in got and "nucleus" not in got
  # No 'prompts' section (runs written before it existed): numbered prompts.
  old = {k: v for k, v in a0.items() if k != "prompts"}
  got = tables.side_by_side_samples({"α=0": old}, decoders=("top_k",), n=1)
  assert got == "### Prompt 1\n\n| decoder | α=0 |\n|---|---|\n| top-k 40 | k0 |\n"
  assert tables.side_by_side_samples({"α=0": {}}) == ""
