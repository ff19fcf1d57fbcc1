"""A faithful stand-in for the part of vLLM's offline interface knowcat uses, running a
transformers model on the CPU (vLLM itself does not install on this machine).

Interface kept: ``LLM(model=..., seed=..., tensor_parallel_size=..., dtype=...,
enable_prefix_caching=..., ...)``, ``LLM.generate(prompts, sampling_params, use_tqdm=...)``
returning one ``RequestOutput`` per prompt, in order, whose ``outputs`` are
``CompletionOutput(index, text, token_ids, finish_reason)``; ``SamplingParams(n,
temperature, top_k, max_tokens, stop, seed)`` with vLLM's meanings: temperature 0 is
greedy, ``top_k`` -1 or 0 is off, generation ends at ``max_tokens``, end-of-sequence
or a ``stop`` string (left out of ``text``), and a request with a ``seed`` draws its
samples from its own generator, so its answers do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CALLS: list[dict] = []  # what the tests inspect: constructor arguments and submitted requests


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    stop: list[str] | None = None
    seed: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    prompt: str
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    def __init__(self, model: str, seed: int = 0, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool | None = None, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        CALLS.append({"init": dict(model=model, seed=seed, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                   enable_prefix_caching=enable_prefix_caching, **kwargs)})
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.seed = seed
        self._count = 0

    @torch.inference_mode()
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True):
        if isinstance(prompts, str):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        CALLS.append({"generate": [(p, sp) for p, sp in zip(prompts, params)]})
        return [self._one(p, sp) for p, sp in zip(prompts, params)]

    def _one(self, prompt: str, sp: SamplingParams) -> RequestOutput:
        self._count += 1
        g = torch.Generator().manual_seed(sp.seed if sp.seed is not None else self.seed * 1_000_003 + self._count)
        ids = self.tok(prompt, return_tensors="pt")["input_ids"]
        outs = []
        for i in range(sp.n):
            out = self.model(input_ids=ids, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
            gen: list[int] = []
            reason = "length"
            for _ in range(sp.max_tokens or 16):
                if sp.temperature == 0:
                    t = int(logits.argmax())
                else:
                    lg = logits / sp.temperature
                    if sp.top_k and sp.top_k > 0:
                        kth = torch.topk(lg, sp.top_k).values[-1]
                        lg = lg.masked_fill(lg < kth, -torch.inf)
                    t = int(torch.multinomial(torch.softmax(lg, -1), 1, generator=g))
                if t == self.tok.eos_token_id:
                    reason = "stop"
                    break
                gen.append(t)
                text = self.tok.decode(gen, skip_special_tokens=True)
                if sp.stop and any(s in text for s in sp.stop):
                    reason = "stop"
                    break
                out = self.model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[0, -1]
            text = self.tok.decode(gen, skip_special_tokens=True)
            for s in sp.stop or []:
                text = text.split(s, 1)[0]
            outs.append(CompletionOutput(i, text, gen, reason))
        return RequestOutput(prompt, outs)
