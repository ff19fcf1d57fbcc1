"""A faithful stand-in for the part of vLLM's offline interface knowcat uses, running a
transformers model on the CPU (vLLM itself does not install on this machine).

Interface kept: ``LLM(model, *, seed=..., tensor_parallel_size=..., dtype=..., ...,
**engine_args)`` as vLLM's: every argument after ``model`` is keyword-only, and the
extra keywords go to ``EngineArgs``, a dataclass, so a name it does not have is refused
with ``TypeError: EngineArgs.__init__() got an unexpected keyword argument ...``; and
``data_parallel_size > 1`` in one process is refused with vLLM's ``ValueError`` (since
vLLM 0.11.1, PR #27282: offline data parallelism needs one process per rank, or the
``external_launcher`` backend under torchrun). ``LLM.generate(prompts, sampling_params, *, use_tqdm=...)``
returning one ``RequestOutput`` per prompt, in order, with its ``prompt_token_ids``, whose ``outputs`` are
``CompletionOutput(index, text, token_ids, finish_reason)``; ``SamplingParams(n,
temperature, top_k, max_tokens, stop, seed)`` with vLLM's meanings: temperature 0 is
greedy, ``top_k`` -1 or 0 is off, generation ends at ``max_tokens``, end-of-sequence
or a ``stop`` string (left out of ``text``), and a request with a ``seed`` draws its
samples from its own generator, so its answers do not depend on the batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from probes.generation import cache_kwargs, output_cache

CALLS: list[dict] = []  # what the tests inspect: constructor arguments and submitted requests
# when set, each engine also appends its constructor call (with its process id and CUDA_VISIBLE_DEVICES)
# to this file: how a test sees engines built in other processes
LOG_ENV = "FAKE_VLLM_LOG"

# the keywords vLLM's LLM() passes on to EngineArgs (a subset of its fields: those a knowcat user may give)
ENGINE_ARGS = frozenset({
    "enable_prefix_caching", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "pipeline_parallel_size",
    "data_parallel_size", "distributed_executor_backend", "kv_cache_dtype", "block_size", "enable_chunked_prefill",
    "disable_log_stats", "load_format", "download_dir", "tokenizer_revision", "code_revision", "max_logprobs",
    "enable_lora", "max_lora_rank", "seed", "served_model_name", "hf_overrides", "compilation_config",
})


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
    prompt_token_ids: list[int] | None = None


class LLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, dtype: str = "auto", quantization: str | None = None,
                 revision: str | None = None, seed: int | None = None, gpu_memory_utilization: float = 0.9,
                 swap_space: float = 4, cpu_offload_gb: float = 0, enforce_eager: bool = False, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for k in kwargs:
            if k not in ENGINE_ARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{k}'")
        dp = int(kwargs.get("data_parallel_size", 1))
        if dp > 1 and kwargs.get("distributed_executor_backend") != "external_launcher":
            raise ValueError(f"LLM(data_parallel_size={dp}) is not supported for single-process usage and may hang. "
                             "Please use the explicit multi-process data-parallel example at "
                             "'examples/offline_inference/data_parallel.py'.")
        call = dict(model=model, seed=seed, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        CALLS.append({"init": call})
        if os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                    "init": call}) + "\n")
        self.tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.seed = seed or 0
        self._count = 0

    @torch.inference_mode()
    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True):
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
            cache, logits = output_cache(out), out.logits[0, -1]
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
                out = self.model(input_ids=torch.tensor([[t]]), use_cache=True, **cache_kwargs(self.model, cache))
                cache, logits = output_cache(out), out.logits[0, -1]
            text = self.tok.decode(gen, skip_special_tokens=True)
            for s in sp.stop or []:
                text = text.split(s, 1)[0]
            outs.append(CompletionOutput(i, text, gen, reason))
        return RequestOutput(prompt, outs, ids[0].tolist())
