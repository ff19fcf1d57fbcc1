"""Figures for the report, each returned as an inline HTML fragment (SVG for small plots,
base64 PNG for dense ones), drawn with seaborn / matplotlib on the Agg backend.

Every figure is built from aggregated numbers (counts, histograms, per-epoch
means), never one mark per example, so its size does not grow with the dataset.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
PALETTE = dict(zip(CATEGORIES, ("#1b7837", "#7fbf7b", "#f1a340", "#b2182b")))
sns.set_theme(style="whitegrid", context="notebook")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML


def _png(fig, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def category_bars(by_relation: dict[str, dict[str, int]]) -> str:
    rels = sorted(by_relation)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rels) + 2), 3.2))
    bottom = np.zeros(len(rels))
    for c in CATEGORIES:
        vals = np.array([by_relation[r].get(c, 0) for r in rels], float)
        tot = np.array([max(1, sum(by_relation[r].values())) for r in rels], float)
        ax.bar(rels, vals / tot, bottom=bottom, color=PALETTE[c], label=c)
        bottom += vals / tot
    ax.set_ylabel("share of questions")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=60)
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    return _svg(fig)


def p_correct_histograms(greedy: list[float], sampled: list[float]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, vals, title in ((axes[0], greedy, "P_Correct(T=0)"), (axes[1], sampled, "P_Correct(T>0)")):
        v = np.asarray([x for x in vals if x is not None], float)
        counts, edges = np.histogram(v, bins=np.linspace(0, 1, 11)) if len(v) else (np.zeros(10), np.linspace(0, 1, 11))
        ax.bar(edges[:-1], counts, width=0.1, align="edge", color="#4575b4")
        ax.set_title(f"{title} (n = {len(v)})", fontsize=10)
        ax.set_xlabel("share correct")
    axes[0].set_ylabel("questions")
    return _svg(fig)


def exposure_by_category(stats: dict[str, dict]) -> str:
    """Box plots from precomputed quantiles per category (the demo world's ground truth)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    boxes = []
    for c in CATEGORIES:
        s = stats.get(c)
        if s:
            boxes.append({"label": f"{c}\n(n={s['n']})", "whislo": s["p5"], "q1": s["q1"], "med": s["median"],
                          "q3": s["q3"], "whishi": s["p95"], "mean": s["mean"], "fliers": []})
    if boxes:
        bp = ax.bxp(boxes, showmeans=True, patch_artist=True)
        for patch, c in zip(bp["boxes"], [c for c in CATEGORIES if stats.get(c)]):
            patch.set_facecolor(PALETTE[c])
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("mentions in the corpus")
    return _svg(fig)


def accuracy_by_exposure(bins: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.8))
    labels = [f"{b['count_from']}" + (f"-{b['count_to']}" if b["count_to"] != b["count_from"] else "") for b in bins]
    ax.bar(labels, [100 * b["accuracy"] for b in bins], color="#4575b4")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_xlabel("mentions of the fact")
    ax.tick_params(axis="x", rotation=45)
    return _svg(fig)


def fitting_curves(curves: dict[str, dict[str, float]], title: str) -> str:
    """``curves``: {category: {epoch: fraction fitted}}."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for c, cur in curves.items():
        ep = sorted(cur, key=int)
        ax.plot([int(e) for e in ep], [100 * cur[e] for e in ep], marker="o", ms=3, label=c,
                color=PALETTE.get(c, "#333333"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training examples fitted (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _svg(fig)


def accuracy_vs_unknown(rows_by_stop: dict[str, list[dict]], subset: str) -> str:
    fig, axes = plt.subplots(1, len(rows_by_stop), figsize=(4.2 * len(rows_by_stop), 3), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (stop, rows) in zip(axes, rows_by_stop.items()):
        x = [r["unknown_percent"] for r in rows]
        ax.plot(x, [r.get(subset) for r in rows], marker="o", label="D (X% Unknown)", color="#b2182b")
        kx = [r["unknown_percent"] for r in rows if r.get(f"known_{subset}") is not None]
        if kx:
            ax.plot(kx, [r[f"known_{subset}"] for r in rows if r.get(f"known_{subset}") is not None], marker="s",
                    label="D_Known (Unknown removed)", color="#1b7837")
        ax.set_title(stop.replace("_", " ").upper(), fontsize=10)
        ax.set_xlabel("% Unknown in D")
    axes[0].set_ylabel(f"test accuracy, {subset.replace('_', '-')} (%)")
    axes[-1].legend(fontsize=8)
    return _svg(fig)


def residual_boxes(quantiles: dict[str, dict], title: str) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    boxes = [{"label": c[:2], "whislo": q["p5"], "q1": q["q1"], "med": q["median"], "q3": q["q3"],
              "whishi": q["p95"], "fliers": []} for c, q in quantiles.items()]
    if boxes:
        bp = ax.bxp(boxes, patch_artist=True)
        for patch, c in zip(bp["boxes"], quantiles):
            patch.set_facecolor(PALETTE.get(c, "#999999"))
    ax.set_ylabel("relative residual")
    ax.set_title(title, fontsize=10)
    return _svg(fig)


def class_heatmap(table: dict[str, dict[str, int]], title: str) -> str:
    classes = list(table)
    M = np.array([[table[cl].get(c, 0) for c in CATEGORIES] for cl in classes])
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    sns.heatmap(M, annot=True, fmt="d", cmap="Blues", xticklabels=[c[:2] for c in CATEGORIES],
                yticklabels=classes, cbar=False, ax=ax)
    ax.set_title(title, fontsize=10)
    return _svg(fig)


def tolerance_sweep(sweep: dict[str, dict], xlabel: str, title: str) -> str:
    tols = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    for cl, color in (("no_solution", "#b2182b"), ("unique", "#1b7837"), ("infinitely_many", "#f1a340")):
        ax.plot([float(t) for t in tols], [sweep[t]["class_counts"].get(cl, 0) for t in tols], marker="o",
                label=cl, color=color)
    if all(float(t) > 0 for t in tols) and len(tols) > 1 and max(float(t) for t in tols) / min(float(t) for t in tols) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _svg(fig)


def quantiles(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return {}
    p5, q1, med, q3, p95 = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(len(v)), "p5": float(p5), "q1": float(q1), "median": float(med), "q3": float(q3),
            "p95": float(p95), "mean": float(v.mean())}
