"""The sweeps' figures as PNG files (matplotlib, Agg backend, labelled axes).

Separate from the sweep and the tables so that nothing but a plot imports matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_lines(path: str, x: Sequence[float], series: Mapping[str, tuple[Sequence[float],
               Sequence[float] | None]], *, xlabel: str, ylabel: str, title: str = "",
               figsize: tuple[float, float] = (5.0, 3.5), dpi: int = 100,
               percent: bool = False, ylim: tuple[float | None, float | None] | None = None
               ) -> None:
  """One line per series (label -> (means, stds or None)) with error bars, as a PNG.

  A series whose stds are None is a reference level (dashed grey); `ylim` fixes the y
  range (None at either end: automatic), in plotted units (percent when `percent`).
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
  scale = 100.0 if percent else 1.0
  for label, (mean, std) in series.items():
    m = scale * np.asarray(mean, float)
    if std is None:  # a reference level, not a measured series
      ax.plot(np.asarray(x, float), m, linestyle="--", color="gray", label=label)
      continue
    s = scale * np.nan_to_num(np.asarray(std, float))
    ax.errorbar(np.asarray(x, float), m, yerr=s, marker="o", capsize=3, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


# Table 1's panels: (record key, y label, scale, y range; None: automatic).
TABLE1_PANELS: tuple[tuple[str, str, float, tuple[float, float] | None], ...] = (
    ("hf_proportion", "HF word proportion, sampling (%)", 100.0, (0.0, 100.0)),
    ("generative_entropy", "generative entropy (nats/token)", 1.0, None),
    ("val_ppl", "validation perplexity", 1.0, None),
)


def plot_table1(path: str, alphas: Sequence[float],
                stats: Mapping[str, Mapping[str, Sequence[tuple[float, float] | None]]], *,
                reference_hf: float | None = None,
                paper_hf: Mapping[str, Mapping[float, float]] | None = None, title: str = "",
                figsize: tuple[float, float] = (13.0, 3.8), dpi: int = 100) -> Any:
  """Table 1 as three panels against alpha (`TABLE1_PANELS`); returns the (closed) figure.

  `stats[model][key]` holds one (mean, std over seeds) per alpha, or None where the
  metric is missing; a std of nan (one seed) draws no error bar. `reference_hf` (a share)
  is the held-out text's HF proportion, a dashed line in the HF panel. `paper_hf` maps a
  label to {alpha: HF percent} of the paper, drawn as markers at the alphas of the sweep.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(TABLE1_PANELS), figsize=figsize, dpi=dpi, squeeze=False,
                           sharex=True)
  for ax, (key, ylabel, scale, ylim) in zip(axes[0], TABLE1_PANELS):
    _series_panel(ax, alphas, stats, key, scale, ylim)
    if key == "hf_proportion":
      if reference_hf is not None and math.isfinite(reference_hf):
        ax.axhline(scale * reference_hf, linestyle="--", color="gray",
                   label="held-out reference")
      for j, (label, values) in enumerate((paper_hf or {}).items()):
        pts = [(a, v) for a, v in values.items() if any(math.isclose(a, b) for b in alphas)]
        if pts:
          ax.plot([a for a, _ in pts], [v for _, v in pts], linestyle="none",
                  marker="sxD^v"[j % 5], markersize=7, markerfacecolor="none",
                  color="black", label=label, clip_on=False)
    _finish_panel(ax, ylabel, ylim)
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend(fontsize=7)  # one colour per model in every panel
  return _save(plt, fig, path, title, dpi)


def _save(plt, fig, path: str, title: str, dpi: int) -> Any:
  """Title, tight layout, PNG, close; returns the (closed) figure."""
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return fig


def _series_panel(ax, alphas, stats, key, scale, ylim) -> None:
  """One errorbar line per series of `stats[series][key]` ((mean, std) per alpha, or None)."""
  x = np.asarray(alphas, float)
  for i, (label, by_key) in enumerate(stats.items()):
    cells = [c if c is not None else (math.nan, math.nan) for c in by_key.get(key, [])]
    if not cells or all(math.isnan(m) for m, _ in cells):
      continue
    m = scale * np.asarray([c[0] for c in cells], float)
    s = scale * np.nan_to_num(np.asarray([c[1] for c in cells], float))
    # Unclipped: a share of 100% sits on the HF panel's upper edge.
    ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=label, color=f"C{i}",
                clip_on=ylim is None)


def _finish_panel(ax, ylabel, ylim) -> None:
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel("feedback strength α")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def plot_panel_grid(path: str, alphas: Sequence[float],
                    rows: Sequence[tuple[str, Mapping[str, Mapping[str, Sequence]]]],
                    panels: Sequence[tuple[str, str, float, tuple[float, float] | None]], *,
                    title: str = "", dpi: int = 100) -> Any:
  """A grid of panels against alpha: one row per (row title, stats) and one column per
  panel (key, ylabel, scale, ylim), stats as in `plot_table1`; returns the closed figure."""
  plt = _pyplot()
  fig, axes = plt.subplots(len(rows), len(panels), figsize=(3.6 * len(panels), 3.0 * len(rows)),
                           dpi=dpi, squeeze=False, sharex=True)
  for r, (row_title, stats) in enumerate(rows):
    for c, (key, ylabel, scale, ylim) in enumerate(panels):
      _series_panel(axes[r][c], alphas, stats, key, scale, ylim)
      _finish_panel(axes[r][c], ylabel, ylim)
      axes[r][c].set_title(row_title, fontsize=9)
    if axes[r][0].get_legend_handles_labels()[0]:
      axes[r][0].legend(fontsize=7)
  return _save(plt, fig, path, title, dpi)


def plot_grouped_bars(path: str, groups: Sequence[str], panels: Sequence[tuple[str, Mapping[
                      str, tuple[Sequence[float], Sequence[float] | None]]]], *, xlabel: str,
                      title: str = "", figsize: tuple[float, float] = (9.0, 3.5),
                      dpi: int = 100) -> None:
  """Side-by-side panels of grouped bars: panel = (ylabel, {series: (values, stds)})."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=figsize, dpi=dpi, squeeze=False)
  x = np.arange(len(groups))
  for ax, (ylabel, series) in zip(axes[0], panels):
    width = 0.8 / max(len(series), 1)
    for j, (label, (vals, stds)) in enumerate(series.items()):
      yerr = None if stds is None or np.all(np.isnan(np.asarray(stds, float))) else (
          np.nan_to_num(np.asarray(stds, float)))
      ax.bar(x + (j - (len(series) - 1) / 2) * width, np.asarray(vals, float), width,
             yerr=yerr, capsize=2, label=label)
    ax.set_xticks(x, list(groups))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def _box_smooth(c: np.ndarray) -> np.ndarray:
  """Mean over each cell's 3x3 neighbourhood (zero padded)."""
  p = np.pad(c, 1)
  return sum(p[i:i + c.shape[0], j:j + c.shape[1]] for i in range(3) for j in range(3)) / 9.0


def plot_density(path: str, x: Sequence[float], y: Sequence[float], *, xlabel: str,
                 ylabel: str, title: str = "", bins: int = 30,
                 contours: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                 figsize: tuple[float, float] = (5.5, 4.0), dpi: int = 100) -> None:
  """2-D histogram of (x, y) points (colour = number of points per bin) with a colourbar.

  `contours` overlays other point clouds (label -> (x, y)) as density contour lines.
  """
  plt = _pyplot()
  x, y = np.asarray(x, float), np.asarray(y, float)
  all_x = np.concatenate([x] + [np.asarray(cx, float) for cx, _ in (contours or {}).values()])
  all_y = np.concatenate([y] + [np.asarray(cy, float) for _, cy in (contours or {}).values()])
  xe = np.linspace(all_x.min(), all_x.max() + 1e-9, bins + 1)
  ye = np.linspace(all_y.min(), all_y.max() + 1e-9, bins + 1)
  fig, ax = plt.subplots(figsize=figsize, dpi=dpi)
  counts, _, _ = np.histogram2d(x, y, bins=[xe, ye])
  masked = np.ma.masked_equal(counts.T, 0)
  mesh = ax.pcolormesh(xe, ye, masked, cmap="viridis", shading="flat")
  fig.colorbar(mesh, ax=ax, label="density (steps per bin)")
  handles = []
  cmap = plt.get_cmap("autumn")
  for j, (label, (cx, cy)) in enumerate((contours or {}).items()):
    c, _, _ = np.histogram2d(np.asarray(cx, float), np.asarray(cy, float), bins=[xe, ye])
    c = _box_smooth(c)  # a few hundred points in a fine grid give ragged contours
    if c.max() <= 0:
      continue
    colour = cmap(j / max(len(contours) - 1, 1))
    centers_x, centers_y = (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2
    levels = np.unique(np.quantile(c[c > 0], [0.5, 0.9]))
    if len(levels) and levels[-1] < c.max():
      ax.contour(centers_x, centers_y, c.T, levels=levels, colors=[colour], linewidths=1.0)
    handles.append(plt.Line2D([], [], color=colour, label=label))
  if handles:
    ax.legend(handles=handles, fontsize=8, loc="upper left")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def png_size(path: str) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk; ValueError if the file is not a PNG."""
  with open(path, "rb") as f:
    head = f.read(24)
  if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
    raise ValueError(f"{path} is not a PNG file")
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
