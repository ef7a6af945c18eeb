"""stabjax.plots: every figure is a PNG of the requested size; Table 1's panels and markers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from stabjax import plots


def test_plots_are_pngs_of_the_requested_size(tmp_path):
  p = str(tmp_path / "lines.png")
  plots.plot_lines(p, [0, 0.05, 0.2], {"gpt2": ([0.3, 0.6, 1.0], [0.01, 0.02, float("nan")]),
                                       "ref": ([0.3] * 3, None)},
                   xlabel="α", ylabel="%", percent=True, figsize=(4.0, 3.0), dpi=50,
                   ylim=(0.0, 100.0))
  assert plots.png_size(p) == (200, 150)
  p = str(tmp_path / "bars.png")
  plots.plot_grouped_bars(p, ["α=0", "α=0.2"], [("hf", {"a": ([1, 2], [0.1, 0.1]),
                                                        "b": ([2, 1], None)}),
                                                ("H", {"a": ([3, 4], None)})],
                          xlabel="α", figsize=(6.0, 2.0), dpi=50)
  assert plots.png_size(p) == (300, 100)
  p = str(tmp_path / "density.png")
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=200), rng.normal(size=200)
  plots.plot_density(p, x, y, xlabel="loss (nats)", ylabel="H (nats)", bins=10,
                     contours={"α=0.2": (x + 1, y - 1)}, figsize=(4.0, 4.0), dpi=40)
  assert plots.png_size(p) == (160, 160)
  assert os.path.getsize(p) < 200_000
  txt = tmp_path / "not.png"
  txt.write_bytes(b"hello, this is not a png file")
  with pytest.raises(ValueError, match="not a PNG"):
    plots.png_size(str(txt))


def test_plot_table1_three_panels_reference_and_paper_markers(tmp_path):
  nan = math.nan
  stats = {"gpt2_tiny": {"hf_proportion": [(0.3, 0.01), (1.0, 0.0)],
                         "generative_entropy": [(3.0, 0.1), (0.1, nan)],
                         "val_ppl": [(30.0, 1.0), None]},
           "bert_tiny": {"hf_proportion": [(0.25, nan)] * 2}}
  paper = {"paper GPT-2 1B (mean of 3 seeds)": {0.0: 26.83, 0.05: 65.77, 0.2: 100.0},
           "paper BERT 1B": {0.0: 23.5, 0.05: 56.3, 0.2: 100.0}}
  p = str(tmp_path / "table1.png")
  fig = plots.plot_table1(p, [0.0, 0.2], stats, reference_hf=0.27, paper_hf=paper,
                          title="t", figsize=(9.0, 3.0), dpi=50)
  assert plots.png_size(p) == (450, 150)
  hf, ent, ppl = fig.axes
  assert [ax.get_ylabel() for ax in fig.axes] == [t for _, t, _, _ in plots.TABLE1_PANELS]
  assert hf.get_ylim() == (0.0, 100.0)
  lines = {l.get_label(): l for l in hf.get_lines() if not l.get_label().startswith("_")}
  # The paper's markers only at the sweep's alphas (0.05 is not in it), in percent.
  np.testing.assert_allclose(lines["paper GPT-2 1B (mean of 3 seeds)"].get_xydata(),
                             [[0.0, 26.83], [0.2, 100.0]])
  np.testing.assert_allclose(lines["paper BERT 1B"].get_xydata(), [[0.0, 23.5], [0.2, 100.0]])
  np.testing.assert_allclose(lines["held-out reference"].get_ydata(), [27.0, 27.0])
  assert lines["held-out reference"].get_linestyle() == "--"
  # Model lines: HF in percent; bert has no entropy / perplexity and is not drawn there.
  data = sorted(tuple(l.get_ydata()) for l in hf.get_lines() if l.get_label().startswith("_")
                and len(l.get_xdata()) == 2 and l.get_marker() == "o")
  assert data == [(25.0, 25.0), (30.0, 100.0)]
  assert [tuple(l.get_ydata()) for l in ent.get_lines() if l.get_marker() == "o"] == [
      (3.0, 0.1)]
  assert len([l for l in ppl.get_lines() if l.get_marker() == "o"]) == 1
  handles, labels = hf.get_legend_handles_labels()
  assert {"gpt2_tiny", "bert_tiny", "held-out reference", "paper BERT 1B"} <= set(labels)
