"""Draws benchmarks/plots/benchmarks.png from the figures `benchmarks.report` hands it.

    benchmarks/.venvs/tools/bin/python -m benchmarks.plot figures.json out.png

Runs in the tools venv, where matplotlib is installed; the project does not depend on it.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "obanpro": "#1f6feb",
    "oban": "#8250df",
    "celery": "#2da44e",
    "dramatiq": "#bf8700",
    "pgqueuer": "#cf222e",
    "procrastinate": "#6e7781",
    "baseline": "#444444",
}


def errors(values):
    """Asymmetric error bars (median to min, median to max) from (median, min, max) triples."""
    return [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]


def main() -> None:
    with open(sys.argv[1]) as handle:
        data = json.load(handle)
    out = sys.argv[2]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    fig.suptitle(data["title"] + "  (medians; bars show min–max)", fontsize=13)

    # Scaling: CPU wall time and no-op throughput against processes.
    ax = axes[0][0]
    points = [s for s in data["scaling"] if s["cpu"]]
    if points:
        xs = [s["processes"] for s in points]
        ax.errorbar(
            xs,
            [s["cpu"][0] for s in points],
            yerr=errors([s["cpu"] for s in points]),
            marker="o",
            color=COLORS["obanpro"],
            label="obanpro start -p N",
            capsize=4,
        )
        ideal = [s for s in points if s["ideal"]]
        if ideal:
            ax.errorbar(
                [s["processes"] for s in ideal],
                [s["ideal"][0] for s in ideal],
                yerr=errors([s["ideal"] for s in ideal]),
                marker="s",
                linestyle="--",
                color=COLORS["baseline"],
                label="no queue: loop (1), Pool(N)",
                capsize=4,
            )
        if data.get("oban_cpu"):
            ax.axhline(
                data["oban_cpu"][0],
                color=COLORS["oban"],
                linestyle=":",
                label="oban start (one process)",
            )
        ax.set_xticks(xs)
        ax.set_ylim(bottom=0)
    ax.set_xlabel("worker processes")
    ax.set_ylabel(f"seconds for {data['cpu_jobs']} SHA-256 jobs (lower is better)")
    ax.set_title("Scaling: CPU-bound wall time")
    ax.legend(fontsize=8)

    ax2 = axes[0][1]
    points = [s for s in data["scaling"] if s["noop"]]
    if points:
        xs = [s["processes"] for s in points]
        ax2.errorbar(
            xs,
            [s["noop"][0] for s in points],
            yerr=errors([s["noop"] for s in points]),
            marker="o",
            color=COLORS["obanpro"],
            label="obanpro start -p N",
            capsize=4,
        )
        if data.get("oban_noop"):
            ax2.axhline(
                data["oban_noop"][0],
                color=COLORS["oban"],
                linestyle=":",
                label="oban start (one process)",
            )
        ax2.set_xticks(xs)
        ax2.set_ylim(bottom=0)
    ax2.set_xlabel("worker processes")
    ax2.set_ylabel("no-op jobs per second (higher is better)")
    ax2.set_title("Scaling: no-op throughput, limit 50")
    ax2.legend(fontsize=8)

    def barh(ax, rows, xlabel, title):
        if not rows:
            ax.set_visible(False)
            return
        labels = [r["label"] for r in rows]
        values = [r["value"] for r in rows]
        ys = range(len(rows))
        ax.barh(
            ys,
            [v[0] for v in values],
            xerr=errors(values),
            color=[COLORS.get(r["tool"], "#999") for r in rows],
            capsize=3,
        )
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        for y, v in zip(ys, values):
            ax.text(
                v[2],
                y,
                f" {v[0]:,.2f}" if v[0] < 100 else f" {v[0]:,.0f}",
                va="center",
                fontsize=8,
            )

    barh(
        axes[1][0],
        data["cpu"],
        "seconds (lower is better)",
        f"Peers: {data['cpu_jobs']} SHA-256 jobs, start to all done",
    )
    barh(
        axes[1][1],
        data["noop"],
        "jobs per second (higher is better)",
        "Peers: no-op throughput, limit 50",
    )

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
