"""Cheaper knowledge probes than ``knowcat estimate``, against the same SliCK categories.

    python bench/estimator_floor.py --run runs/demo [--calibrate 0.2] [--seed 0]

For the train questions of a demo run (its model, its ``categorized.jsonl``), one forward pass each,
without a few-shot prompt, over
- the subject's name alone (as KEEN probes entity representations), and
- the question alone,
takes the hidden state of every block at the last token, fits the estimator's classifier
(:func:`linear_models.classifiers.fit_calibrated`: the 32 principal components of the hidden state and
the token count, penalty by cross-validated log-loss) on a seeded random share of the questions and
validates it on the rest against SliCK (:func:`linear_models.classifiers.validate`). Prints, per input and
block, the tokens fed per example, AUROC of Unknown against the Known categories with its 95% interval,
the drop-Unknown rule's shares and the confusion matrix: what an estimator that reads less than the
question under a prompt (``knowcat estimate``'s 16 tokens per example on the demo) would know.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hidden_last(model, tokenizer, texts: list[str], batch: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
    """Every block's hidden state at each text's last token (right-padded batches), and the tokens fed."""
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    n_blocks = model.config.num_hidden_layers + 1
    H = [np.zeros((len(enc), model.config.hidden_size), np.float32) for _ in range(n_blocks)]
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for s in range(0, len(enc), batch):
            b = enc[s:s + batch]
            lens = torch.tensor([len(i) for i in b])
            L = int(lens.max())
            x = torch.tensor([i + [pad] * (L - len(i)) for i in b], device=model.device)
            mask = (torch.arange(L)[None] < lens[:, None]).long().to(model.device)
            out = model(input_ids=x, attention_mask=mask, output_hidden_states=True)
            for blk, h in enumerate(out.hidden_states):
                H[blk][s:s + len(b)] = h[torch.arange(len(b)), lens - 1].float().cpu().numpy()
    return H, np.array([len(i) for i in enc], dtype=float)


def main(argv=None):
    from knowcat.demo import world_examples
    from knowcat.slick import CATEGORIES
    from linear_models.classifiers import fit_calibrated, validate
    from probes.loading import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="a demo run directory (world/, model/, categorized.jsonl)")
    p.add_argument("--calibrate", type=float, default=0.2, help="share of the questions the classifier is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    run = Path(args.run)
    cats = {r["id"]: r["category"] for r in map(json.loads, open(run / "categorized.jsonl"))}
    examples = [e for e in world_examples(run / "world") if e.split == "train" and e.id in cats]
    classes = tuple(CATEGORIES)
    y = np.array([classes.index(cats[e.id]) for e in examples])
    model, tok = load_model(str(run / "model"), device=args.device, dtype="float32")
    rng = np.random.default_rng(args.seed)
    cal = np.zeros(len(examples), dtype=bool)
    cal[rng.choice(len(examples), int(round(args.calibrate * len(examples))), replace=False)] = True
    print(f"{len(examples)} questions, {int(cal.sum())} calibrate, {int((~cal).sum())} validate", flush=True)
    for name, texts in (("subject", [e.subject for e in examples]), ("question", [e.question for e in examples])):
        H, ntok = hidden_last(model, tok, texts)
        S = ntok[:, None]
        for blk in range(1, len(H)):
            fit = fit_calibrated(S[cal], H[blk][cal], y[cal], len(classes), pca_dim=32)
            v = validate(y[~cal], fit.model.predict_proba(S[~cal], H[blk][~cal]), classes)
            lo, hi = v.auroc_unknown_ci
            print(f"{name:8s} block {blk}: {ntok.mean():.1f} tokens per example; AUROC Unknown vs Known "
                  f"{v.auroc_unknown:.3f} [{lo:.3f}, {hi:.3f}]; Unknown dropped {v.unknown_dropped:.1%}, "
                  f"HighlyKnown kept {v.highly_known_kept:.1%}; confusion {v.confusion}", flush=True)


if __name__ == "__main__":
    main()
