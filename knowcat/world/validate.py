"""The ground-truth check: does few-shot greedy accuracy follow exposure?

Joins per-example greedy results with the world's exposure counts and reports
the Spearman correlation between a fact's exposure count and its greedy
accuracy, the accuracy of never-seen facts, and that of facts seen at least as
often as the upper-quartile exposure of the evaluated facts.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def exposure_check(p_correct: dict[str, float], exposures: list[dict]) -> dict:
    """``p_correct``: example id -> greedy accuracy over the prompts."""
    rows = [(e["count"], p_correct[e["id"]]) for e in exposures if e["id"] in p_correct]
    if not rows:
        raise ValueError("no evaluated example matches an exposure record (ids differ?)")
    counts = np.array([r[0] for r in rows], dtype=float)
    acc = np.array([r[1] for r in rows], dtype=float)
    q75 = float(np.quantile(counts, 0.75))
    never = counts == 0
    often = counts >= q75
    rho = spearmanr(counts, acc).statistic if np.ptp(acc) > 0 else float("nan")
    bins = [0, 1, 2, 4, 8, 16, 32, 64, np.inf]
    by_bin = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (counts >= lo) & (counts < hi)
        if m.any():
            by_bin.append({"count_from": lo, "count_to": None if hi == np.inf else hi - 1,
                           "n": int(m.sum()), "accuracy": float(acc[m].mean())})
    return {
        "n": len(rows),
        "spearman": float(rho),
        "never_seen_n": int(never.sum()),
        "never_seen_accuracy": float(acc[never].mean()) if never.any() else float("nan"),
        "upper_quartile_count": q75,
        "upper_quartile_n": int(often.sum()),
        "upper_quartile_accuracy": float(acc[often].mean()) if often.any() else float("nan"),
        "overall_accuracy": float(acc.mean()),
        "by_exposure": by_bin,
    }


def format_check(r: dict) -> str:
    lines = [f"greedy accuracy vs exposure over {r['n']} facts: Spearman {r['spearman']:.3f}; "
             f"never seen {r['never_seen_accuracy']:.1%} (n={r['never_seen_n']}); "
             f"seen >= {r['upper_quartile_count']:.0f} times (upper quartile) {r['upper_quartile_accuracy']:.1%} "
             f"(n={r['upper_quartile_n']}); overall {r['overall_accuracy']:.1%}"]
    for b in r["by_exposure"]:
        hi = "+" if b["count_to"] is None else f"-{b['count_to']:.0f}"
        lines.append(f"  exposure {b['count_from']:.0f}{hi}: n={b['n']:5d} accuracy {b['accuracy']:.1%}")
    return "\n".join(lines)
