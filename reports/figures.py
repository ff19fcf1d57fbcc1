"""Figures for the report, each returned as an inline HTML fragment, drawn with seaborn /
matplotlib on the Agg backend.

SVG for small plots, PNG for dense ones, by one rule: each figure counts the marks
it draws (bars, points, heatmap cells, line vertices, boxes); up to
``DENSE_MARKS`` it is an inline SVG (vector, sharp at any zoom, a few hundred bytes
a mark), above it a base64 PNG at a fixed size and resolution, whose bytes are
bounded by its pixels whatever the number of marks. Most figures draw aggregates
(counts, histograms, per-epoch means, quantile boxes) and so stay SVG at any scale;
the per-example point clouds (category against exposure, surrogate residuals by
category) and the per-relation bars of a dataset with many relations turn PNG
when the run is big. Each fragment is wrapped in
``<figure class="fig" data-fig=NAME data-format=svg|png data-marks=N>``.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from linear_models.names import CATEGORIES  # noqa: E402
PALETTE = dict(zip(CATEGORIES, ("#1b7837", "#7fbf7b", "#f1a340", "#b2182b")))
sns.set_theme(style="whitegrid", context="notebook")
# labels come from the data (relation names, category names): never read them as mathtext, where a "$"
# would start a formula and a name like "$\\x$" would stop the report with a parse error
matplotlib.rcParams["text.parse_math"] = False


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


# above this many marks a figure is a PNG (see the module docstring)
DENSE_MARKS = 1000


def is_dense(marks: int) -> bool:
    return marks > DENSE_MARKS


def _emit(fig, name: str, marks: int) -> str:
    """The figure as SVG or PNG by the rule, in a ``<figure>`` that says which and why."""
    fmt = "png" if is_dense(marks) else "svg"
    body = _png(fig) if fmt == "png" else _svg(fig)
    return f'<figure class="fig" data-fig="{name}" data-format="{fmt}" data-marks="{int(marks)}">{body}</figure>'


def _strip(ax, groups: list[np.ndarray], colors: list[str], seed: int = 0, horizontal: bool = False) -> int:
    """One point per value, jittered across its group's slot (seeded: the same figure every build)."""
    rng = np.random.default_rng(seed)
    n = 0
    for k, (v, color) in enumerate(zip(groups, colors)):
        if not len(v):
            continue
        j = k + 1 + rng.uniform(-0.28, 0.28, len(v))
        x, y = (v, j) if horizontal else (j, v)
        ax.scatter(x, y, s=4 if len(v) > 2000 else 8, alpha=0.25 if len(v) > 2000 else 0.5, color=color,
                   edgecolors="none", zorder=1, rasterized=False)
        n += len(v)
    return n


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
    return _emit(fig, "category_bars", len(CATEGORIES) * len(rels))


def p_correct_histograms(greedy: list[float], sampled: list[float]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, vals, title in ((axes[0], greedy, "P_Correct(T=0)"), (axes[1], sampled, "P_Correct(T>0)")):
        v = np.asarray([x for x in vals if x is not None], float)
        counts, edges = np.histogram(v, bins=np.linspace(0, 1, 11)) if len(v) else (np.zeros(10), np.linspace(0, 1, 11))
        ax.bar(edges[:-1], counts, width=0.1, align="edge", color="#4575b4")
        ax.set_title(f"{title} (n = {len(v)})", fontsize=10)
        ax.set_xlabel("share correct")
    axes[0].set_ylabel("questions")
    return _emit(fig, "p_correct_histograms", 20)


def exposure_by_category(values: dict[str, list[float]]) -> str:
    """Category against exposure (the demo world's ground truth): one point per example (its fact's
    mentions in the corpus), with each category's box (5th, 25th, 50th, 75th, 95th percentiles) over it."""
    cats = [c for c in CATEGORIES if len(values.get(c, []))]
    groups = [np.asarray(values[c], float) for c in cats]
    fig, ax = plt.subplots(figsize=(6, 3))
    marks = _strip(ax, groups, [PALETTE[c] for c in cats])
    boxes = []
    for c, v in zip(cats, groups):
        q = quantiles(v)
        boxes.append({"label": f"{c}\n(n={q['n']})", "whislo": q["p5"], "q1": q["q1"], "med": q["median"],
                      "q3": q["q3"], "whishi": q["p95"], "mean": q["mean"], "fliers": []})
    if boxes:
        bp = ax.bxp(boxes, showmeans=True, patch_artist=True, widths=0.5, zorder=2)
        for patch in bp["boxes"]:
            patch.set_facecolor("none")
            patch.set_linewidth(1.5)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("mentions in the corpus")
    return _emit(fig, "exposure_by_category", marks + len(boxes))


def accuracy_by_exposure(bins: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.8))
    labels = [f"{b['count_from']}" + (f"-{b['count_to']}" if b["count_to"] != b["count_from"] else "") for b in bins]
    ax.bar(labels, [100 * b["accuracy"] for b in bins], color="#4575b4")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_xlabel("mentions of the fact")
    ax.tick_params(axis="x", rotation=45)
    return _emit(fig, "accuracy_by_exposure", len(bins))


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
    return _emit(fig, "fitting_curves", sum(len(c) for c in curves.values()))


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
    return _emit(fig, "accuracy_vs_unknown", sum(2 * len(rows) for rows in rows_by_stop.values()))


def residual_boxes(values: dict[str, list[float]], title: str) -> str:
    """A surrogate's relative residual by category: one point per example, each category's box over it."""
    cats = [c for c in values if len(values[c])]
    groups = [np.asarray(values[c], float) for c in cats]
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    marks = _strip(ax, groups, [PALETTE.get(c, "#999999") for c in cats])
    boxes = []
    for c, v in zip(cats, groups):
        q = quantiles(v)
        boxes.append({"label": f"{c[:2]} ({q['n']})", "whislo": q["p5"], "q1": q["q1"], "med": q["median"],
                      "q3": q["q3"], "whishi": q["p95"], "fliers": []})
    if boxes:
        bp = ax.bxp(boxes, patch_artist=True, widths=0.5, zorder=2)
        for patch in bp["boxes"]:
            patch.set_facecolor("none")
            patch.set_linewidth(1.5)
    ax.set_ylabel("relative residual")
    ax.set_title(title, fontsize=10)
    return _emit(fig, "residuals", marks + len(boxes))


def class_heatmap(table: dict[str, dict[str, int]], title: str) -> str:
    classes = list(table)
    M = np.array([[table[cl].get(c, 0) for c in CATEGORIES] for cl in classes])
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    sns.heatmap(M, annot=True, fmt="d", cmap="Blues", xticklabels=[c[:2] for c in CATEGORIES],
                yticklabels=classes, cbar=False, ax=ax)
    ax.set_title(title, fontsize=10)
    return _emit(fig, "class_heatmap", M.size)


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
    return _emit(fig, "tolerance_sweep", 3 * len(tols))


def quantiles(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return {}
    p5, q1, med, q3, p95 = np.percentile(v, [5, 25, 50, 75, 95])
    return {"n": int(len(v)), "p5": float(p5), "q1": float(q1), "median": float(med), "q3": float(q3),
            "p95": float(p95), "mean": float(v.mean())}
