"""The benchmark's PNG: throughput vs the bare endpoint, submit latency vs fleet size, failover times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    tp = results.get("throughput", {}).get("summary")
    ax = axes[0]
    if tp:
        names = ["bare", "heartbeat", "submit", "progress"]
        rps = [tp[n]["rps"] for n in names]
        bars = ax.bar(names, rps, color=["#999999", "#1f77b4", "#2ca02c", "#ff7f0e"])
        for bar, name in zip(bars, names, strict=True):
            label = "ceiling" if name == "bare" else f"{tp[name]['ratio_to_bare']:.0%}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.axhline(0.7 * tp["bare"]["rps"], color="red", linestyle="--", linewidth=1, label="70% of bare")
        ax.legend(loc="lower right")
    ax.set_title(f"Requests/s on one server core (c={results.get('throughput', {}).get('concurrency', '?')})")
    ax.set_ylabel("requests/s")

    ax = axes[1]
    sc = results.get("scheduling")
    if sc:
        sizes = [row["nodes"] for row in sc["sizes"]]
        ax.plot(sizes, [row["latency"]["p50_ms"] for row in sc["sizes"]], "o-", label="p50 (one at a time)")
        ax.plot(sizes, [row["latency"]["p99_ms"] for row in sc["sizes"]], "s-", label="p99 (one at a time)")
        ax.axhline(1.5 * sc["sizes"][0]["latency"]["p99_ms"], color="red", linestyle="--", linewidth=1,
                   label="1.5x p99 at 100 nodes")
        ax.set_xscale("log")
        ax2 = ax.twinx()
        ax2.plot(sizes, [row["throughput"]["rps"] for row in sc["sizes"]], "^:", color="#2ca02c",
                 label="submits/s (right)")
        ax2.set_ylabel("submits/s")
        ax2.set_ylim(bottom=0)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
        ax.set_ylim(bottom=0)
    ax.set_title("Submit-to-assigned latency vs fleet size")
    ax.set_xlabel("registered nodes")
    ax.set_ylabel("ms")

    ax = axes[2]
    fo = results.get("failover")
    if fo:
        for i, label in enumerate(k for k in ("short", "default") if k in fo):
            run = fo[label]
            xs = [i] * len(run["trials"])
            ax.plot(xs, [t["latency_s"] for t in run["trials"]], "o", alpha=0.7,
                    label=f"{run['heartbeat_interval_s']:g} s / {run['ttl_s']:g} s (measured)")
            ax.vlines(i + 0.15, run["model_s"]["min"], run["model_s"]["max"], color="gray", linewidth=3)
        if "default_model_s" in fo:
            m = fo["default_model_s"]
            ax.vlines(1.15, m["min"], m["max"], color="gray", linewidth=3)
            ax.plot([1.15], [m["mean"]], "_", color="black", markersize=20, label="10 s / 30 s (model)")
        ax.set_xticks([0, 1], ["test settings", "defaults"])
        ax.set_xlim(-0.5, 1.6)
        ax.legend(fontsize=8)
    ax.set_title("Node killed -> job assigned elsewhere (grey: model range)")
    ax.set_ylabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
