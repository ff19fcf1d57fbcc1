"""The engine: what knowcat asks of a language model, and the one place that picks an implementation.

An :class:`Engine` does two things:

- ``generate(rounds, ...)``: greedy answers and seeded samples for :class:`PromptRequest` s
  (a shared ``prefix`` + a ``suffix``), each answer cut at the first ``stop`` (a newline).
  Requests come in *rounds*, which the caller forms: a round is submitted whole, and
  ``prepare(request)`` is asked for each request of a round before the round starts, after
  every earlier round's results were handed to ``on_result``; it may replace a request (drop
  its samples) or return ``None`` to skip it. Sample ``s`` of a request is drawn from its
  stream seed ``streams[s]``, so answers do not depend on batch, order or round.
- ``score(requests, layers=())``: teacher-forced log-probabilities of given continuations,
  the first-token margin, greedy match and hidden states at chosen blocks
  (:mod:`probes.scoring`).

Implementations: :class:`TransformersEngine` (any causal LM through transformers, on a CPU
or GPU) and :class:`probes.vllm_backend.VLLMEngine`. :func:`open_engine` is the only place
that chooses one. The rounds loop is :func:`run_rounds`, shared by every implementation;
an implementation only computes one round.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Protocol, Sequence, runtime_checkable

from probes.generation import Generation, PromptRequest
from probes.scoring import Score, ScoreRequest, ScoreStats

ENGINES = ("transformers", "vllm")

Prepare = Callable[[PromptRequest], "PromptRequest | None"]
OnResult = Callable[[PromptRequest, Generation], object]
Progress = Callable[[int], object]


@runtime_checkable
class Engine(Protocol):
    """What knowcat asks of a model (see the module's docstring)."""

    name: str

    @property
    def device(self) -> str: ...

    # optional: ``batch_rows``, the rows (a greedy answer or one sample) the engine decodes together,
    # or ``None`` where it schedules its own batches; callers size their rounds to fill it

    def generate(self, rounds: Iterable[Sequence[PromptRequest]], *, max_new_tokens: int = 32,
                 temperature: float = 0.5, top_k: int = 40, stop: str = "\n", prepare: Prepare | None = None,
                 on_result: OnResult | None = None, progress: Progress | None = None
                 ) -> dict[Hashable, Generation]: ...

    def score(self, requests: Iterable[ScoreRequest], layers: Sequence[int] = (), *, progress: Progress | None = None,
              stats: ScoreStats | None = None) -> dict[Hashable, Score]: ...
    # ``progress`` counts scored requests; ``stats`` accumulates the tokens fed (per request too)


def run_rounds(generate_round: Callable[[list[PromptRequest], Progress | None], dict[Hashable, Generation]],
               rounds: Iterable[Sequence[PromptRequest]], prepare: Prepare | None = None,
               on_result: OnResult | None = None, progress: Progress | None = None) -> dict[Hashable, Generation]:
    """The rounds loop every engine shares: ``prepare`` each request of a round, compute the round
    (``generate_round(requests, progress)``, the engine's part), hand each result to ``on_result``.
    ``progress`` counts finished or skipped requests."""
    results: dict[Hashable, Generation] = {}
    for rnd in rounds:
        todo = []
        for req in rnd:
            if prepare is not None:
                new = prepare(req)
                if new is None:
                    if progress is not None:
                        progress(1)
                    continue
                req = new
            todo.append(req)
        if not todo:
            continue
        out = generate_round(todo, progress)
        for req in todo:
            results[req.key] = out[req.key]
            if on_result is not None:
                on_result(req, out[req.key])
    return results


class TransformersEngine:
    """Today's engine: a transformers causal LM, shared-prefix KV caches (:mod:`probes.generation`)
    and batched teacher-forced scoring (:mod:`probes.scoring`). :attr:`forward_tokens` counts the
    tokens it has fed to the model (padding excluded), over every ``generate`` and ``score`` call;
    :attr:`prefix_tokens`, of those, the shared prefixes' (each encoded once, whatever the number
    of prompts that share it)."""

    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int | None = None, log=None,
                 prefix_reuse: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "") or "transformers"
        self.batch_size = batch_size
        self.log = log
        self.prefix_reuse = prefix_reuse
        self.forward_tokens = self.prefix_tokens = 0
        # prefix KV caches and prompt states, shared by every call (probes.generation.PrefixCache, PromptStates)
        self._prefixes = self._states = None

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", batch_size: int | None = None, log=None,
             **load_options) -> "TransformersEngine":
        from probes.loading import load_model

        m, tok = load_model(model, device=device, dtype=dtype, **load_options)
        return cls(m, tok, name=str(model), batch_size=batch_size, log=log)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def batch_rows(self) -> int:
        """Rows decoded together (the given batch size, or the device's default)."""
        from probes.generation import default_batch_size

        return self.batch_size or default_batch_size(self.model)

    def generate(self, rounds, *, max_new_tokens=32, temperature=0.5, top_k=40, stop="\n", prepare=None,
                 on_result=None, progress=None):
        from probes.generation import PrefixCache, PromptStates, RoundGenerator

        if self._prefixes is None:
            self._prefixes, self._states = PrefixCache(self.model), PromptStates(self.model)
        gen = RoundGenerator(self.model, self.tokenizer, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                             temperature=temperature, top_k=top_k, stop=stop, log=self.log,
                             prefix_reuse=self.prefix_reuse, prefixes=self._prefixes, states=self._states)
        try:
            return run_rounds(gen, rounds, prepare, on_result, progress)
        finally:
            self.forward_tokens += gen.forward_tokens
            self.prefix_tokens += gen.prefix_tokens

    def score(self, requests, layers=(), *, progress=None, stats=None):
        from probes.scoring import ScoreStats, score

        stats = stats if stats is not None else ScoreStats()
        before, shared = stats.forward_tokens, stats.shared_tokens
        try:
            return score(self.model, self.tokenizer, requests, layers=layers, log=self.log, stats=stats,
                         prefix_reuse=self.prefix_reuse, progress=progress)
        finally:
            self.forward_tokens += stats.forward_tokens - before
            self.prefix_tokens += stats.shared_tokens - shared


def open_engine(kind: str, model, **options) -> Engine:
    """The one place that chooses an engine. ``kind``: ``transformers`` (``model`` a hub id or
    folder, or an already loaded ``(model, tokenizer)`` pair; options ``device``, ``dtype``,
    ``batch_size``, ``log``) or ``vllm`` (options go to :class:`probes.vllm_backend.VLLMEngine`)."""
    if kind == "transformers":
        if isinstance(model, tuple):
            m, tok = model
            return TransformersEngine(m, tok, batch_size=options.get("batch_size"), log=options.get("log"))
        options = {k: v for k, v in options.items() if k in ("device", "dtype", "batch_size", "log", "revision",
                                                              "trust_remote_code")}
        return TransformersEngine.load(str(model), **options)
    if kind == "vllm":
        from probes.vllm_backend import VLLMEngine

        options = {k: v for k, v in options.items() if k not in ("device", "batch_size", "log")}
        return VLLMEngine(str(model), **options)
    raise ValueError(f"unknown engine {kind!r}; choose from {', '.join(ENGINES)}")
