"""The vLLM backend (``pip install knowcat[vllm]``, ``--backend vllm``).

An :class:`probes.engine.Engine`: the same requests, rounds and output schema as the
transformers engine, so :func:`knowcat.slick.categorize` runs on it unchanged.

- Greedy answers: ``SamplingParams(temperature=0, max_tokens, stop=[stop])``.
- Samples: one request per prompt, ``SamplingParams(n=len(streams), temperature,
  top_k, max_tokens, stop, seed=...)`` with a per-request seed derived from
  (seed, example id, prompt index): the request's first stream seed, which
  :mod:`knowcat.slick` computes from exactly those. vLLM's per-request seeded
  sampling makes the answers reproducible whatever the batch or order.
- ``enable_prefix_caching=True``: the few-shot prefixes shared by every question
  of a relation are computed once by vLLM's automatic prefix caching.
- One round (the caller's: for SliCK, one prompt index) is one submission; ``prepare``
  is asked before each (:func:`probes.engine.run_rounds`), so lazy categorization keeps
  an example whose answers are already correct from getting samples.
- :attr:`VLLMEngine.forward_tokens` counts the tokens it asked vLLM for: each submitted prompt's tokens
  (``RequestOutput.prompt_token_ids``; a sampling request's ``n`` samples share one prompt) and every
  token generated (``CompletionOutput.token_ids``). vLLM's prefix cache may compute fewer prompt
  tokens than that (the few-shot prefixes); the count is what was asked, not a measurement of vLLM.
- Scoring (teacher-forced log-probabilities, hidden states) is not offered: vLLM does not
  expose hidden states, and its prompt log-probabilities are not wired in; use the
  transformers engine for :meth:`score`.
- ``tensor_parallel_size`` is passed to ``vllm.LLM``: one engine is one model replica over
  that many GPUs. Data parallelism is several engines, one process each: vLLM's ``LLM()``
  refuses ``data_parallel_size > 1`` in one process (offline data parallelism is one
  process per rank, as vLLM's ``examples/offline_inference/data_parallel.py`` does), so
  knowcat runs ``--data-parallel-size N`` as N engine processes, each on its own GPUs,
  sharing the run's shards (:func:`knowcat.ray_runner.run_categorize_data_parallel`),
  and over a cluster as Ray actors (``--backend ray --ray-engine vllm``).

vLLM's samples differ from the transformers engine's (another random stream), so
WeaklyKnown / Unknown may differ by sampling noise between the backends; greedy
answers, and so HighlyKnown and MaybeKnown, agree up to numerics.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

from probes.generation import Generation, PromptRequest


def request_seed(req: PromptRequest) -> int:
    """A vLLM seed for a request's samples: its first stream seed, folded into 63 bits."""
    return int(req.streams[0]) & ((1 << 63) - 1) if req.streams else 0


class VLLMEngine:
    """Wraps ``vllm.LLM``; ``llm`` may be given already built (tests pass a fake with the same interface)."""

    def __init__(self, model: str, seed: int = 0, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, llm=None, **llm_kwargs):
        dp = int(llm_kwargs.pop("data_parallel_size", 1) or 1)
        if dp > 1:
            raise ValueError(
                f"data_parallel_size={dp}: one VLLMEngine is one model replica, and vLLM's LLM() refuses data "
                "parallelism inside one process; run one engine per replica instead: knowcat categorize --backend "
                "vllm --data-parallel-size N (knowcat.ray_runner.run_categorize_data_parallel), or over a cluster "
                "--backend ray --ray-engine vllm --ray-workers N")
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as err:  # pragma: no cover - depends on the extra
                raise ImportError("the vLLM backend needs vLLM: pip install 'knowcat[vllm]'") from err
            kw = dict(model=model, seed=seed, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                      **llm_kwargs)
            if max_model_len:
                kw["max_model_len"] = max_model_len
            from probes.loading import MODEL_BUILD_LOCK

            with MODEL_BUILD_LOCK:  # vLLM may build the model through transformers (probes.loading.MODEL_BUILD_LOCK)
                llm = LLM(**kw)
        self.llm = llm
        self.name = model
        self.forward_tokens = 0  # prompt tokens submitted and tokens generated (see the module's docstring)

    @property
    def device(self):
        return "vllm"

    def generate(self, rounds: Iterable[Sequence[PromptRequest]], *, max_new_tokens: int = 32,
                 temperature: float = 0.5, top_k: int = 40, stop: str = "\n",
                 prepare: Callable[[PromptRequest], PromptRequest | None] | None = None,
                 on_result: Callable[[PromptRequest, Generation], object] | None = None,
                 progress: Callable[[int], object] | None = None) -> dict[Hashable, Generation]:
        """:meth:`probes.engine.Engine.generate`: each round one ``llm.generate`` submission."""
        from probes.engine import run_rounds

        def one_round(todo: list[PromptRequest], progress) -> dict[Hashable, Generation]:
            return self._submit(todo, max_new_tokens, temperature, top_k, stop, progress)

        return run_rounds(one_round, rounds, prepare, on_result, progress)

    def _submit(self, todo, max_new_tokens, temperature, top_k, stop, progress) -> dict[Hashable, Generation]:
        from vllm import SamplingParams

        greedy_params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[stop])
        prompts, params, owners = [], [], []
        for i, req in enumerate(todo):
            text = req.prefix + req.suffix
            if req.greedy:
                prompts.append(text)
                params.append(greedy_params)
                owners.append((i, "greedy"))
            if req.streams:
                prompts.append(text)
                params.append(SamplingParams(n=len(req.streams), temperature=temperature, top_k=top_k,
                                             max_tokens=max_new_tokens, stop=[stop], seed=request_seed(req)))
                owners.append((i, "samples"))
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        gens = [Generation(None, []) for _ in todo]
        for (i, kind), out in zip(owners, outs):
            self.forward_tokens += len(getattr(out, "prompt_token_ids", None) or ()) + sum(
                len(o.token_ids or ()) for o in out.outputs)
            texts = [_clean(o.text, stop) for o in out.outputs]
            if kind == "greedy":
                gens[i].greedy = texts[0]
            else:
                gens[i].samples = texts
        if progress is not None:
            progress(len(todo))
        return {req.key: g for req, g in zip(todo, gens)}

    def score(self, requests, layers=(), *, progress=None, stats=None):
        raise NotImplementedError("the vLLM engine does not score continuations (no hidden states in vLLM); "
                                  "open the transformers engine for scoring")


def _clean(text: str, stop: str) -> str:
    return text.split(stop, 1)[0].strip()
