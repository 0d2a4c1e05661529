"""Run reports: a JSON record of every run, and PNG plots of what a person wants to see."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from edgeprune import __version__


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # only when loaded: a header never imports torch by itself
    return torch.get_num_threads() if torch is not None else None


def run_header(command: str, args: dict) -> dict:
    return {
        "edgeprune": __version__,
        "command": command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "node": platform.node(),
                 "torch_threads": _torch_threads()},
    }


def memory_now() -> dict:
    """This process's memory: peak RSS so far (ru_maxrss; llama.cpp runs in-process, so its mapped
    models count), current RSS, and the anonymous part of it (RSS less file-backed pages, which the
    kernel can drop: memory-mapped weights and GGUFs)."""
    import resource

    import psutil

    m = psutil.Process().memory_info()  # read after ru_maxrss, which the kernel updates lazily: take the larger
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, m.rss)
    return {"peak_rss_bytes": peak, "rss_bytes": m.rss,
            "anon_rss_bytes": m.rss - getattr(m, "shared", 0)}


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_widths(plan, stats, path: Path) -> None:
    """Per-layer FFN widths (bars; dropped layers marked) with block importance (line)."""
    plt = pyplot()
    n = plan.base["num_layers"]
    widths = {lp.index: len(lp.ffn_keep) for lp in plan.layers}
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    xs = list(range(n))
    ax.bar(xs, [widths.get(i, 0) for i in xs], color=["#4C72B0" if i in widths else "#DD8452" for i in xs])
    ax.axhline(plan.base["ffn"], color="grey", lw=0.8, ls="--", label=f"dense width {plan.base['ffn']}")
    for i in plan.dropped_layers:
        ax.text(i, plan.base["ffn"] * 0.03, "dropped", rotation=90, ha="center", va="bottom", fontsize=7, color="#DD8452")
    ax.set_xlabel("layer")
    ax.set_ylabel("FFN width kept")
    m = plan.method
    ach = plan.achieved
    ax.set_title(
        f"{m.get('allocation')} allocation, {m.get('score')} score: FFN sparsity {ach.get('ffn_sparsity', 0):.1%}, "
        f"model {ach.get('model_sparsity', 0):.1%}",
        fontsize=9,
    )
    if stats is not None:
        ax2 = ax.twinx()
        ax2.plot(xs, stats.angular, color="black", marker=".", lw=1, label="block importance (angular distance)")
        ax2.set_ylabel("angular distance / pi")
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
