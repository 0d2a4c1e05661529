"""fit's report: report.json, report.md (candidates, the choice and why, the shipped artifact beside
the dense baselines through their runtimes, greedy answers) and frontier.png."""

from __future__ import annotations

import math
from pathlib import Path

from edgeprune.bench import median
from edgeprune.exporters.common import atomic_file
from edgeprune.report import pyplot, write_json


def write_outputs(out: Path, report: dict, candidates, chosen, targets, profile) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "report.json") as tmp:
        write_json(tmp, report)
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text(markdown(report))
    with atomic_file(out / "frontier.png") as tmp:
        plot_frontier(candidates, chosen, targets, profile, tmp)


def plot_frontier(candidates, chosen, targets, profile, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    scored = [c for c in candidates if not math.isinf(c.quality)]
    markers = {0: "o", 2: "s", 4: "^", 6: "D"}
    colors = {}
    for c in scored:
        color = colors.setdefault(c.mix, f"C{len(colors)}")
        ax.scatter(c.prediction.decode_tok_s, max(c.quality, 1e-5), marker=markers.get(c.drop_layers, "o"), color=color,
                   edgecolors="black" if c.check.ok else "none", s=36, alpha=0.9 if c.check.ok else 0.45)
    for dt, color in colors.items():
        ax.scatter([], [], color=color, label=dt)
    for drop, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=f"-{drop} layers")
    if targets.decode_tok_s_min:
        ax.axvline(targets.decode_tok_s_min, color="red", ls="--", lw=1, label=f"target {targets.decode_tok_s_min:g} tok/s")
    if not scored:  # nothing was scored: show where every candidate lands on the latency axis
        ax.scatter([c.prediction.decode_tok_s for c in candidates], [1.0] * len(candidates), marker="|", s=200, color="grey",
                   label="candidates (not scored)")
        ax.text(0.5, 0.6, "no candidate meets the targets", transform=ax.transAxes, ha="center", color="red")
    if chosen is not None:
        ax.scatter(chosen.prediction.decode_tok_s, max(chosen.quality, 1e-5), marker="*", s=320, color="gold",
                   edgecolors="black", zorder=5, label=f"chosen: {chosen.label}")
    if scored:
        ax.set_yscale("log")
    ax.set_xlabel(f"predicted decode tokens/s on {profile.name}")
    ax.set_ylabel("quality loss: KL(dense || candidate), nats/token")
    ax.set_title(f"edgeprune fit --profile {profile.name}: quality-latency frontier (black edge = meets all targets)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = [f"# edgeprune fit --profile {report['profile']['name']}", ""]
    t = report["profile"]["targets"]
    lines.append(f"Targets: decode >= {t.get('decode_tok_s_min')} tok/s, TTFT <= {t.get('ttft_max_s')} s for a "
                 f"{t.get('prompt_tokens')}-token prompt, memory <= {t.get('memory_max')} B.")
    lines.append("")
    lines.append("| candidate | predicted decode tok/s | predicted TTFT s | memory MB | targets | KL structure | KL quant |")
    lines.append("|---|---|---|---|---|---|---|")
    for c in report.get("candidates", []):
        if c["quality_kl"] is None and not c["targets"]["ok"]:
            continue
        p = c["prediction"]
        lines.append(f"| {c['label']} | {p['decode_tok_s']:.1f} | {p['ttft_s']:.2f} | {p['memory']['total'] / 1e6:.0f} | "
                     f"{'ok' if c['targets']['ok'] else 'missed'} | {_f(c['kl_structure'])} | {_f(c['kl_quant'])} |")
    res = report.get("result", {})
    lines.append("")
    if res.get("ok"):
        ch = res["chosen"]
        lines.append(f"**Chosen:** {ch['label']} ({res.get('why', '')}) — quality proxy KL {ch['quality_kl']:.4f}; "
                     f"widths {res['plan']['widths']}; dropped layers {res['plan']['dropped_layers']}.")
        if res.get("speed_bound"):
            lines.append(f"- what bounds decode: {res['speed_bound']['says']}.")
        if report.get("shapes"):
            lines.append(f"- structures searched: {report['shapes']['shapes']} ({report['shapes']['why']}).")
        for f, art in res["artifacts"].items():
            b = art["bench"]
            v = art["export"].get("verification", {})
            lines.append(f"- {f}: `{art['path']}` ({art['dtype']}), verified top-1 {v.get('top1_agreement', float('nan')):.4f}; "
                         f"on this host decode {median(b, 'decode_tok_s'):.1f} tok/s, prefill {median(b, 'prefill_tok_s'):.1f} tok/s, "
                         f"TTFT {median(b, 'ttft_s'):.3f} s, peak RSS {b.get('peak_rss_mb', float('nan')):.0f} MiB"
                         + (f"; dense {median(art['bench_dense'], 'decode_tok_s'):.1f} tok/s -> x{art['measured_decode_speedup']:.2f}" if "bench_dense" in art else "")
                         + (f"; profile {art['host_prediction']['profile']} predicts decode {art['host_prediction']['decode_tok_s']:.1f} tok/s, "
                            f"prefill {art['host_prediction']['prefill_tok_s']:.1f} tok/s, TTFT {art['host_prediction']['ttft_s']:.3f} s"
                            if "host_prediction" in art else ""))
        if res.get("imatrix"):
            lines.append(f"- importance matrix: `{res['imatrix']['path']}` ({res['imatrix']['tokens']} calibration tokens; "
                         f"reuse it with `{res['imatrix']['use']}`)")
        lines += _quality_markdown(report.get("quality"))
    else:
        lines.append("**No candidate meets the targets.** " + "; ".join(res.get("unreachable", [])))
    lines.append("")
    lines.append("Timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.get("timings", {}).items()))
    return "\n".join(lines) + "\n"


def _quality_markdown(q: dict | None) -> list[str]:
    """The shipped artifact beside the dense baselines, measured through their runtimes."""
    if not q:
        return []
    pr = q["protocol"]
    lines = ["", "## Quality of what ships, through the runtime", "",
             f"Held-out self-generated text: {pr['held_out_self']}; real text: {pr['excerpt']}. Reference: {pr['reference']} "
             f"(its excerpt perplexity {q['dense_torch_excerpt_ppl']:.2f}).", "",
             "| artifact | ppl self-generated | ppl excerpt | x dense torch | top-1 vs dense | KL vs dense | factual prompts |",
             "|---|---|---|---|---|---|---|"]
    for label, a in q["artifacts"].items():
        h, e = a["held_out_self"], a["excerpt"]
        hits = f"{a['factual_hits']}/{a['factual_prompts']}" if "factual_hits" in a else "—"
        lines.append(f"| {label} | {h['ppl']:.2f} | {e['ppl']:.2f} | {e['ppl_ratio_vs_dense_torch']:.3f} | {e['top1_vs_dense']:.3f} | "
                     f"{e['kl_vs_dense']:.4f} | {hits} |")
    if q.get("prompts"):
        shipped_label = next(iter(q["artifacts"]))
        mine = q["artifacts"][shipped_label].get("answers") or []
        dense = q.get("dense_answers") or []
        lines += ["", f"Greedy answers ({shipped_label} vs dense q8_0):", "", "| prompt | shipped | dense q8_0 |", "|---|---|---|"]
        for i, p in enumerate(q["prompts"]):
            cell = lambda xs: (xs[i] if i < len(xs) else "").replace("|", "/")[:120]
            lines.append(f"| {p} | {cell(mine)} | {cell(dense)} |")
    return lines


def _f(x):
    return "—" if x is None else f"{x:.4f}"
