"""The SliCK few-shot prompts (Gekhman et al. 2024).

For each relation and prompt index ``j`` (``n_prompts`` of them) ``k`` exemplars
are drawn at random from the exemplar split (dev) of the same relation, once;
every question of the relation is asked under the same ``n_prompts`` prefixes,
so their KV caches can be shared. An example is never its own exemplar, whatever the
ids (the same question can appear in several splits under different ids): an exemplar
is the example's own question when their SQuAD-normalized question texts are equal, or
when both know their subject and they share (subject, relation). Such a slot takes
the prompt's first spare exemplar that is not the question either (the spares follow
the ``k`` exemplars: the one drawn with them, then the rest of the relation's pool in
a seeded order), so prompts without a clash are unchanged.

Format: ``Q: {question}\\nA: {answer}\\n`` per exemplar, then ``Q: {question}\\nA:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from knowcat.examples import QAExample
from knowcat.matching import normalize


@dataclass(frozen=True)
class FewShotConfig:
    n_prompts: int = 10
    k: int = 4
    seed: int = 0
    exemplar_split: str = "dev"


class ExemplarSet(list):
    """One prompt's exemplars: the first ``k`` are used, the rest are spares."""

    def __init__(self, items=(), k: int | None = None):
        super().__init__(items)
        self.k = len(self) - 1 if k is None else k


def exemplar_sets(pool: list[QAExample], cfg: FewShotConfig) -> dict[str, list[list[QAExample]]]:
    """``{relation: [exemplars of prompt 0, ..., prompt n-1]}``; each list holds ``k`` exemplars,
    then the spares: the one drawn with them, then every other exemplar of the relation in a
    seeded order (the lists share their elements, so this costs references only)."""
    by_rel: dict[str, list[QAExample]] = {}
    for ex in pool:
        by_rel.setdefault(ex.relation, []).append(ex)
    out: dict[str, list[list[QAExample]]] = {}
    for rel in sorted(by_rel):
        exs = sorted(by_rel[rel], key=lambda e: e.id)
        if len(exs) < cfg.k + 1:
            raise ValueError(f"relation {rel}: {len(exs)} exemplars in the {cfg.exemplar_split} split, "
                             f"need at least k+1 = {cfg.k + 1}")
        rng = np.random.default_rng([cfg.seed, _rel_key(rel)])
        sets = []
        for j in range(cfg.n_prompts):
            drawn = rng.choice(len(exs), size=cfg.k + 1, replace=False)
            rest = np.setdiff1d(np.arange(len(exs)), drawn)
            rest = rest[np.random.default_rng([cfg.seed, _rel_key(rel), j]).permutation(len(rest))]
            sets.append(ExemplarSet([exs[i] for i in drawn] + [exs[i] for i in rest], k=cfg.k))
        out[rel] = sets
    return out


def _rel_key(rel: str) -> int:
    return int.from_bytes(rel.encode("utf-8")[:8].ljust(8, b"\0"), "little")


def same_question(a: QAExample, b: QAExample) -> bool:
    """Whether ``a`` and ``b`` ask the same question: the same id, the same SQuAD-normalized
    question text, or (where both know it) the same (subject, relation)."""
    if a.id == b.id or _norm(a.question) == _norm(b.question):
        return True
    return (a.subject is not None and b.subject is not None and a.relation == b.relation
            and _norm(a.subject) == _norm(b.subject))


_norm = lru_cache(maxsize=4096)(normalize)  # small: a question is compared a few times in a row, exemplars often


def choose_exemplars(example: QAExample, exemplars_with_spares: list[QAExample], k: int) -> list[QAExample]:
    """The ``k`` exemplars of one prompt for ``example``: the first ``k``, each one that asks the
    example's own question replaced in place by the next spare that does not."""
    spares = (e for e in exemplars_with_spares[k:] if not same_question(example, e))
    chosen = []
    for e in exemplars_with_spares[:k]:
        if same_question(example, e):
            e = next(spares, None)
            if e is None:
                raise ValueError(f"relation {example.relation}: not enough exemplars that differ from "
                                 f"question {example.id!r} to fill {k} slots")
        chosen.append(e)
    return chosen


def qa_block(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}\n"


def prompt_for(example: QAExample, exemplars_with_spares: list[QAExample], k: int | None = None,
               render=None) -> tuple[str, str]:
    """``(prefix, suffix)`` of the prompt asking ``example`` under one exemplar set (``k``:
    the number of exemplars; default: the set's ``k``, or all but one of a plain list).
    ``render``: a :class:`ChatRenderer` (the model's chat template) instead of ``Q: ... A: ...`` blocks."""
    if k is None:
        k = getattr(exemplars_with_spares, "k", len(exemplars_with_spares) - 1)
    chosen = choose_exemplars(example, exemplars_with_spares, k)
    if render is not None:
        return render([(e.question, e.answers[0]) for e in chosen], example.question)
    prefix = "".join(qa_block(e.question, e.answers[0]) for e in chosen)
    return prefix, f"Q: {example.question}\nA:"


class ChatRenderer:
    """Few-shot prompts in a tokenizer's own chat template (``apply_chat_template``): each exemplar a
    user message and an assistant message, then the question as a user message with the generation
    prompt. The prefix (the exemplars' turns) is the longest part of the rendered text that the
    exemplars alone render to, so questions under the same exemplars share it. When the tokenizer
    adds its BOS token itself, a BOS the template writes is dropped (it would be doubled).
    ``answer_sep`` is what goes between prompt and answer: nothing (the template ends the prompt)."""

    answer_sep = ""

    def __init__(self, tokenizer, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is empty): "
                             "a chat template needs a chat model")
        self.tokenizer, self.system = tokenizer, system
        bos = tokenizer.bos_token
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        self._strip = bos if bos and tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] \
            else None
        self._cache: dict = {}

    def _text(self, messages, generation_prompt: bool) -> str:
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if self._strip and text.startswith(self._strip):
            text = text[len(self._strip):]
        return text

    def __call__(self, blocks: list[tuple[str, str]], question: str) -> tuple[str, str]:
        import os

        msgs = [m for q, a in blocks for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        full = self._text(msgs + [{"role": "user", "content": question}], True)
        key = tuple(blocks)
        pre = self._cache.get(key)
        if pre is None:
            pre = self._text(msgs, False) if msgs else ""
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = pre
        if not full.startswith(pre):
            pre = os.path.commonprefix([pre, full])
        return pre, full[len(pre):]


def chat_renderer(tokenizer, system: str | None = None) -> ChatRenderer:
    return ChatRenderer(tokenizer, system)


def answer_sep(render) -> str:
    """What goes between a prompt and its answer: a space after ``A:``, nothing after a chat template."""
    return " " if render is None else render.answer_sep
