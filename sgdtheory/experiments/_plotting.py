"""Shared matplotlib style for the experiment figures: theory as lines, simulation as points.

Every experiment's ``plot(data)`` builds its figure with these helpers so that all figures look
alike:

* :func:`subplots` — a :class:`matplotlib.figure.Figure` (no pyplot state, Agg canvas) with a
  constrained layout and the package style applied;
* :func:`theory` — a theory curve (solid line, drawn under the points);
* :func:`simulated` — simulated points with error bars (open markers, small caps);
* :func:`legend` — a legend that adds the "theory (line) / simulation (points)" key;
* :func:`color` — the i-th colour of a colour-blind-safe cycle (Okabe & Ito);
* :func:`check_note` — a one-line footer with the pass/fail state of the experiment's checks;
* :func:`save` — write the PNG at a modest dpi.

Only matplotlib's object API is used, so figures can be drawn in worker processes and tests
without a display, and they are freed when the last reference goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "COLORS",
    "DPI",
    "STYLE",
    "check_note",
    "color",
    "legend",
    "log_axes",
    "save",
    "simulated",
    "subplots",
    "theory",
]

#: Okabe–Ito colour-blind-safe palette (black last, used for reference lines).
COLORS = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

#: Resolution of the written PNGs (dots per inch).
DPI = 130

#: rcParams applied while a figure is built (fonts readable at README width).
STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.labelsize": 9.5,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "errorbar.capsize": 2.0,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "mathtext.fontset": "dejavusans",
}


def color(i: int) -> str:
    """The ``i``-th colour of :data:`COLORS` (cycling; the black entry is skipped)."""
    return COLORS[i % (len(COLORS) - 1)]


def subplots(nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (4.0, 3.2),
             title: str | None = None, sharex: bool = False, sharey: bool = False):
    """A styled figure with a grid of axes.

    Args:
        nrows, ncols: grid shape.
        panel_size: (width, height) of one panel in inches.
        title: optional figure title (``suptitle``).
        sharex, sharey: share axes as in :meth:`Figure.subplots`.

    Returns:
        ``(fig, axes)`` with ``axes`` a flat NumPy array of Axes (length ``nrows*ncols``).

    The package style :data:`STYLE` is written into ``matplotlib.rcParams`` (so titles, labels
    and legends added after this call use it too).

    >>> fig, axes = subplots(1, 2, title="demo")
    >>> len(axes), type(fig).__name__
    (2, 'Figure')
    """
    mpl.rcParams.update(STYLE)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + (0.3 if title else 0)),
                     layout="constrained", dpi=DPI)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)
        for ax in axes.flat:
            _style_axes(ax)
    if title:
        fig.suptitle(title, fontsize=STYLE["axes.titlesize"] + 1)
    return fig, np.asarray(axes).ravel()


def _style_axes(ax) -> None:
    ax.grid(True, which="major", alpha=STYLE["grid.alpha"], lw=STYLE["grid.linewidth"])
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.tick_params(labelsize=STYLE["xtick.labelsize"])


def log_axes(ax, x: bool = True, y: bool = True) -> None:
    """Log scale on x and/or y (for quantities that span decades)."""
    if x:
        ax.set_xscale("log")
    if y:
        ax.set_yscale("log")


def theory(ax, x, y, label: str | None = None, *, c=None, ls: str = "-", lw: float = 1.6,
           **kwargs):
    """Draw a theory curve as a line (under the simulated points)."""
    kwargs.setdefault("zorder", 2)
    return ax.plot(np.asarray(x), np.asarray(y), ls=ls, lw=lw, color=c, label=label, **kwargs)


def simulated(ax, x, y, yerr=None, label: str | None = None, *, c=None, xerr=None,
              marker: str = "o", ms: float = 4.0, filled: bool = False, **kwargs):
    """Draw simulated points with error bars (open markers unless ``filled``).

    ``yerr``/``xerr`` are one standard error (or a 2×n array of lower/upper errors); ``None``
    draws the points without bars.
    """
    kwargs.setdefault("zorder", 3)
    return ax.errorbar(np.asarray(x), np.asarray(y),
                       yerr=None if yerr is None else np.asarray(yerr),
                       xerr=None if xerr is None else np.asarray(xerr),
                       fmt=marker, ms=ms, color=c, mfc=c if filled else "white", mew=1.1,
                       elinewidth=1.0, capsize=STYLE["errorbar.capsize"], ls="none",
                       label=label, **kwargs)


def legend(ax, *, key: bool = True, loc: str = "best", extra: Sequence = (), **kwargs):
    """Legend of the labelled artists, plus a grey "theory / simulation (±1 s.e.)" key.

    Args:
        key: add the two grey key entries (line = theory, open circle = simulation).
        loc: legend location.
        extra: more ``(handle, label)`` pairs to append.
    """
    handles, labels = ax.get_legend_handles_labels()
    if key:
        handles += [Line2D([], [], color="0.35", lw=1.6),
                    Line2D([], [], color="0.35", marker="o", mfc="white", ls="none", ms=4)]
        labels += ["theory", "simulation (±1 s.e.)"]
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    kwargs.setdefault("fontsize", STYLE["legend.fontsize"])
    kwargs.setdefault("frameon", False)
    return ax.legend(handles, labels, loc=loc, **kwargs)


def check_note(fig, checks: Iterable, *, max_chars: int = 160) -> None:
    """Footer line "checks: k/n passed" (names of failed checks appended) at the bottom left.

    ``checks`` holds :class:`~sgdtheory.experiments._common.Check` objects or their dicts.
    """
    checks = list(checks)
    if not checks:
        return
    passed = [bool(c["passed"] if isinstance(c, dict) else c.passed) for c in checks]
    names = [c["name"] if isinstance(c, dict) else c.name for c in checks]
    text = f"checks: {sum(passed)}/{len(passed)} passed"
    failed = [n for n, ok in zip(names, passed, strict=True) if not ok]
    if failed:
        text += " — FAILED: " + ", ".join(failed)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    fig.supxlabel(text, fontsize=7.5, color="0.3" if not failed else "#D55E00", x=0.01,
                  ha="left")


def save(fig, path, *, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``dpi`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
