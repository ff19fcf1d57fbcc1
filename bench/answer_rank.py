"""The rank of the blog's answer system before and after the fix, on a model.

    python bench/answer_rank.py --run runs/demo --model runs/demo/model [--n 12] [--max-tokens 4]

For ``n`` train examples (at most ``max-tokens`` answer tokens, the SliCK prompt 0):
- the naive system: A = [0; d h / d x_gen] with h the readout state *after* the final norm at
  all m + 1 answer positions (the forced first block included): its rank at the default
  tolerance against m (d - 1), and for each answer block the share of the norm's null
  direction (r_t / g, g the norm's weight: d norm(r) / d r maps nothing onto it... its transpose
  annihilates it) that lies in A's numerical left null space (1: the deficit is the norm's);
- the fixed system: A = d r / d x_gen with r the pre-norm states at the m positions that depend
  on x_gen: its rank against m d, the same share (0: no deficit from the norm) and its smallest
  singular value relative to the largest (what a remaining deficit is made of).
Prints one line per example and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from knowcat.surrogate import SurrogateConfig, _load_examples, _prompts
    from linear_models.lstsq import svd_solve
    from probes.jacobians import answer_jacobian, answer_system, final_norm
    from probes.loading import load_model
    from probes.surrogate_inputs import answer_end_token

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args(argv)
    cfg = SurrogateConfig(max_examples=400)
    todo, cats, pool, protocol = _load_examples(Path(args.run), cfg, None)
    prompts = _prompts(todo, pool, protocol, 0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    model.requires_grad_(False)
    norm = final_norm(model)
    end = answer_end_token(tok)
    out, done = [], 0
    for e in todo:
        if done >= args.n:
            break
        sysm = answer_system(model, tok, prompts[e.id], e.answers[0], end)
        m, d = sysm.x_gen.shape
        if m > args.max_tokens:
            continue
        done += 1
        J = answer_jacobian(model, sysm)  # pre-norm, [m d, m d]
        blocks = [torch.func.jacrev(norm)(sysm.prenorm[t + 1]) for t in range(m)]
        post = torch.block_diag(*blocks) @ J
        naive = torch.cat([post.new_zeros(d, m * d), post], 0)
        b = torch.zeros(naive.shape[0])
        rn = int(svd_solve(naive, b)["rank"])
        rp = int(svd_solve(J, torch.zeros(m * d))["rank"])
        g = getattr(norm, "weight", None)

        def radial_in_null(M):
            """Per answer block t, the share of the norm's null direction r_t / g (zero elsewhere)
            that lies in M's numerical left null space (singular values at or below the cutoff)."""
            res = svd_solve(M, torch.zeros(M.shape[0]))
            U_, S_, _ = torch.linalg.svd(M, full_matrices=True)
            S_full = torch.cat([S_, S_.new_zeros(M.shape[0] - len(S_))])
            null = U_[:, S_full <= res["cutoff"]]
            out_ = []
            for t in range(m):
                u = torch.zeros(M.shape[0])
                u[M.shape[0] - (m - t) * d:M.shape[0] - (m - t - 1) * d] = \
                    sysm.prenorm[t + 1] / (g if g is not None else 1)
                out_.append(round(float((null.T @ u).norm() / u.norm()), 4))
            return out_, float(S_[-1] / S_[0])

        naive_share, _ = radial_in_null(naive)
        pre_share, pre_smin = radial_in_null(J)
        rec = {"id": e.id, "m": m, "d": d, "naive_rank": rn, "m_times_d_minus_1": m * (d - 1),
               "naive_radial_in_null": naive_share, "prenorm_rank": rp, "m_times_d": m * d,
               "prenorm_radial_in_null": pre_share, "prenorm_smallest_relative_singular_value": pre_smin}
        out.append(rec)
        print(json.dumps(rec))
    naive_pattern = sum(r["naive_rank"] <= r["m_times_d_minus_1"] for r in out)
    full = sum(r["prenorm_rank"] == r["m_times_d"] for r in out)
    nr = [x for r in out for x in r["naive_radial_in_null"]]
    pr = [x for r in out for x in r["prenorm_radial_in_null"]]
    print(f"naive (after the norm, first block included): rank <= m(d-1) in {naive_pattern} of {len(out)}, the norm's "
          f"radial direction in the null space: share min {min(nr):.4f} mean {sum(nr) / len(nr):.4f} over {len(nr)} blocks; "
          f"pre-norm system: full rank m d in {full} of {len(out)}, radial share max {max(pr):.4f} mean "
          f"{sum(pr) / len(pr):.4f}; smallest relative singular value of the pre-norm system: "
          f"{min(r['prenorm_smallest_relative_singular_value'] for r in out):.2e} to "
          f"{max(r['prenorm_smallest_relative_singular_value'] for r in out):.2e}")


if __name__ == "__main__":
    main()
