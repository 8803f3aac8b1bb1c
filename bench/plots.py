"""PNG plots of the benchmarks' JSON figures, for people who would rather look than read.

``python -m bench.plots duplex FIGURES.json OUT.png`` redraws a saved run; each benchmark also takes
``--plot PATH`` to draw its own run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_duplex(figures: dict, path: str | Path) -> None:
    """Step time (p50, p99) and dropped frames against live sessions, one line per engine mode."""
    plt = _pyplot()
    from matplotlib.ticker import ScalarFormatter

    rows = figures["rows"]
    modes = sorted({r["mode"] for r in rows}, key=lambda m: m != "batched")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in modes:
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["sessions"])
        n = [r["sessions"] for r in rs]
        label = "one at a time" if mode == "sequential" else mode
        line = ax1.plot(n, [r["step_ms_p50"] for r in rs], marker="o", label=f"{label} p50")[0]
        ax1.plot(n, [r["step_ms_p99"] for r in rs], marker=".", ls="--", color=line.get_color(), label=f"{label} p99")
        ax2.plot(n, [r["dropped_frames"] for r in rs], marker="o", color=line.get_color(), label=label)
    ax1.axhline(figures.get("frame_ms", 40.0), color="grey", lw=1, ls=":", label="one frame (real time)")
    for ax, title, ylabel in ((ax1, "engine step time", "ms"), (ax2, "late or skipped frames", "frames")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("live voice sessions")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    fig.suptitle(f"full-duplex engine, batched vs one session at a time ({figures.get('device', '')})", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"duplex": plot_duplex}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in PLOTS:
        print(f"usage: python -m bench.plots {{{','.join(PLOTS)}}} FIGURES.json OUT.png", file=sys.stderr)
        return 2
    PLOTS[argv[0]](json.loads(Path(argv[1]).read_text()), argv[2])
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
