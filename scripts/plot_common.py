"""What every benchmark figure shares: byte-reproducible PNGs, one legend outside the data, and
a style that keeps the default configuration's line visible on top of the others."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# PNG text chunks written with every figure: nothing that changes between two runs of
# `make plots` (no software version, no date).
METADATA = {"Software": None}


def save(fig, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (the same bytes for the same figure) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata=METADATA)
    plt.close(fig)
    return path


def legend_below(fig, axes, ncol: int = 4, fontsize: int = 8) -> float:
    """One legend for all ``axes`` below them (each label once, in drawing order), where it
    covers no data; returns the fraction of the figure's height it takes, for ``tight_layout``'s
    ``rect``."""
    handles, labels = [], []
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in labels:
                handles.append(handle)
                labels.append(text)
    if not handles:
        return 0.0
    rows = -(-len(handles) // ncol)
    height = fig.get_figheight()
    bottom = min(0.4, (0.3 + 0.22 * rows) / height)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=fontsize, frameon=False)
    return bottom


def emphasis(default: bool) -> dict:
    """Line style of the default configuration (thick, hollow markers, drawn over the others,
    whose markers show through) or of any other."""
    if default:
        return dict(lw=2.6, ms=10, mfc="none", mew=2, zorder=5)
    return dict(lw=1.3, ms=5, zorder=3)


def runnable(command: str) -> str:
    """A recorded ``python ...`` command as a fresh shell in the repository root runs it (the
    project's interpreter is .venv's, and .venv is not activated there)."""
    return f".venv/bin/{command}" if command.startswith("python ") else command
