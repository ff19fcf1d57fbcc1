"""Fine-tune a causal LM on one training set and measure it after every epoch.

Training is the field's own stack: a ``transformers.Trainer`` (so the same code
runs on several devices under ``accelerate launch`` or ``torchrun``), full
fine-tuning or LoRA through ``peft``. Each training record is a prompt and a
completion (as :mod:`knowcat.mixtures` writes them); the loss is on the
completion's tokens only, which end with the end-of-sequence token (or a
newline when the tokenizer has none).

After every epoch the model answers, greedily, the training set (an example is
*fitted* when its answer reproduces its training target), the dev set and the
test set (accuracy overall, per SliCK category, in-distribution and OOD;
hallucination and abstention rates). Each epoch's measurements land in
``OUT/epochs/epoch_NNN.json`` and its answers in ``epoch_NNN.answers.jsonl``
before the epoch's checkpoint; ``OUT/metrics.json`` gathers them with
EARLY_STOP (the best dev epoch, the earliest on ties) and CONVERGENCE (the last).

A killed run started again resumes from the last *complete* epoch checkpoint in
``OUT/checkpoints`` (model, optimizer, scheduler, RNG states and data order) and
skips the epochs already measured; a finished run is not redone. A checkpoint is
complete once every process has finished writing it: rank 0 then writes
``knowcat_complete.json`` into it (its step and every file with its size) and only
then removes the older checkpoints, so a kill at any moment, even halfway through
a save, leaves at least the previous complete checkpoint (or none, and the run
starts over). A checkpoint without a valid marker is never resumed from.

EARLY_STOP needs a dev set; without one it is undefined (``null`` in
``metrics.json``, with a note and a warning in the log), never a guess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from knowcat.io import atomic_write_json
from knowcat.matching import is_correct, normalize
from knowcat.slick import CATEGORIES


@dataclass
class FinetuneConfig:
    epochs: int = 50  # the paper's values as defaults: 50 epochs, lr 1e-5, batch 128
    lr: float = 1e-5
    batch_size: int = 128  # per optimizer step (per_device_batch * devices * grad_accum)
    per_device_batch_size: int | None = None  # None: batch_size on one device
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "constant"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    seed: int = 0
    max_new_tokens: int = 24
    match: str = "exact"
    abstention: str = "I don't know"
    bf16: bool = False
    eval_batch_size: int | None = None  # rows decoded together (None: from memory)
    save_model: bool = True  # the final (CONVERGENCE) model or adapter in OUT/model
    log_every: int = 0  # Trainer logging steps (0: once per epoch)
    # which runs measure the test set after every epoch: comma-separated globs over the run folder's name
    # ("*": all). The others (with a dev set) measure it only where the analysis reads it: at each epoch
    # whose dev accuracy beats every earlier epoch's (EARLY_STOP is one of them) and at the last (CONVERGENCE)
    test_each_epoch: str = "*"


# ---------------------------------------------------------------------------------------------
# data


def encode_training_set(rows: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels: the prompt's labels are -100, the completion's (plus an
    end token) are learned."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else \
        tokenizer("\n", add_special_tokens=False)["input_ids"]
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=True)["input_ids"]
    comps = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(prompts, comps):
        ids = list(p) + list(c) + end
        out.append({"input_ids": ids, "labels": [-100] * len(p) + list(c) + end})
    return out


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats: list[dict]) -> dict:
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ---------------------------------------------------------------------------------------------
# measuring


def answer_prompts(model, tokenizer, prompts: dict, template: str, max_new_tokens: int = 24,
                   batch_size: int | None = None) -> dict:
    """Greedy answers ``{key: answer}`` to ``{key: prompt}``, asked through the engine interface
    (:func:`probes.engine.open_engine` on the model being trained, one round); prompts share the
    template's text before ``{question}``, so its tokens are encoded once."""
    from probes.engine import open_engine
    from probes.generation import PromptRequest

    head = template.split("{question}")[0]
    reqs = [PromptRequest(k, head, p[len(head):]) if p.startswith(head) else PromptRequest(k, "", p)
            for k, p in prompts.items()]
    engine = open_engine("transformers", (model, tokenizer), batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        out = engine.generate([reqs], max_new_tokens=max_new_tokens, stop="\n")
    finally:
        if was_training:
            model.train()
    return {k: (g.greedy or "").strip() for k, g in out.items()}


def score_answers(items: list[dict], answers: dict, cfg: FinetuneConfig, ood_relations: set[str]) -> dict:
    """Accuracy, per category, in-distribution / OOD, abstention and hallucination rates."""
    abst = normalize(cfg.abstention)

    def block(rows):
        n = len(rows)
        correct = sum(r["correct"] for r in rows)
        abstained = sum(r["abstained"] for r in rows)
        answered = n - abstained
        by_cat = {}
        for c in CATEGORIES:
            rc = [r for r in rows if r.get("category") == c]
            if rc:
                by_cat[c] = {"n": len(rc), "accuracy": sum(r["correct"] for r in rc) / len(rc)}
        return {"n": n, "accuracy": correct / n if n else None, "abstention_rate": abstained / n if n else None,
                "answered": answered,
                "accuracy_answered": correct / answered if answered else None,
                "hallucination_rate": (answered - correct) / answered if answered else None,
                "by_category": by_cat}

    rows = []
    for it in items:
        a = answers[it["id"]]
        rows.append({"id": it["id"], "relation": it["relation"], "category": it.get("category"), "answer": a,
                     "correct": is_correct(a, it["answers"], cfg.match), "abstained": normalize(a) == abst})
    res = {"all": block(rows)}
    if ood_relations:
        res["in_distribution"] = block([r for r in rows if r["relation"] not in ood_relations])
        res["ood"] = block([r for r in rows if r["relation"] in ood_relations])
    return res, rows


def measure_epoch(model, tokenizer, epoch: int, train_rows: list[dict], eval_sets: dict[str, list[dict]],
                  template: str, cfg: FinetuneConfig, ood_relations: set[str]) -> tuple[dict, list[dict]]:
    prompts = {("train", r["id"]): r["prompt"] for r in train_rows}
    for name, items in eval_sets.items():
        prompts.update({(name, it["id"]): template.format(question=it["question"]) for it in items})
    t = time.time()
    answers = answer_prompts(model, tokenizer, prompts, template, cfg.max_new_tokens, cfg.eval_batch_size)
    metrics = {"epoch": epoch, "seconds_measuring": None}
    per_example = []
    fitted_by = defaultdict(list)
    for r in train_rows:
        a = answers[("train", r["id"])]
        ok = normalize(a) == normalize(r["completion"])
        fitted_by[r.get("category")].append(ok)
        per_example.append({"set": "train", "id": r["id"], "category": r.get("category"), "answer": a,
                            "target": r["completion"].strip(), "fitted": ok})
    metrics["train"] = {"n": len(train_rows),
                        "fitted": sum(sum(v) for v in fitted_by.values()) / max(1, len(train_rows)),
                        "fitted_by_category": {c: sum(v) / len(v) for c, v in fitted_by.items() if v},
                        "n_by_category": {c: len(v) for c, v in fitted_by.items()}}
    for name, items in eval_sets.items():
        res, rows = score_answers(items, {it["id"]: answers[(name, it["id"])] for it in items}, cfg,
                                  ood_relations)
        metrics[name] = res
        per_example += [{"set": name, **r} for r in rows]
    metrics["seconds_measuring"] = round(time.time() - t, 2)
    return metrics, per_example


def tests_every_epoch(cfg: FinetuneConfig, run_name: str) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(run_name, g.strip()) for g in cfg.test_each_epoch.split(",") if g.strip())


def may_be_early_stop(dev_accuracy: float | None, earlier: list[dict], dev: str = "dev") -> bool:
    """Whether an epoch with this dev accuracy can end up EARLY_STOP (the best dev epoch, the earliest on
    ties): its accuracy beats every earlier epoch's."""
    if dev_accuracy is None:
        return True
    prev = [(m.get(dev) or {}).get("all", {}).get("accuracy") for m in earlier]
    return all(p is None or dev_accuracy > p for p in prev)


# ---------------------------------------------------------------------------------------------
# the run


def read_epochs(out_dir) -> list[dict]:
    """The measured epochs of the fine-tuning run in ``out_dir``, in order."""
    from knowcat.rundir import FinetuneDir

    return FinetuneDir(out_dir).read_epochs()


NO_DEV_NOTE = ("no dev set was measured, so EARLY_STOP (the best dev epoch) is undefined; "
               "give a dev set (knowcat finetune --dev DATA) to choose it")


def choose_stops(epochs: list[dict], dev: str = "dev") -> dict:
    """EARLY_STOP: the epoch with the best dev accuracy (the earliest on ties); CONVERGENCE: the last.

    Without dev measurements EARLY_STOP is ``None`` and ``early_stop_note`` says why."""
    if not epochs:
        return {}
    out = {"convergence": epochs[-1]["epoch"]}
    scored = [m for m in epochs if (m.get(dev) or {}).get("all", {}).get("accuracy") is not None]
    if scored:
        best = max(scored, key=lambda m: (m[dev]["all"]["accuracy"], -m["epoch"]))
        out.update(early_stop=best["epoch"], early_stop_rule="best dev accuracy, the earliest epoch on ties")
    else:
        out.update(early_stop=None, early_stop_note=NO_DEV_NOTE)
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints

CHECKPOINT_MARKER = "knowcat_complete.json"


def _checkpoint_step(p: Path) -> int | None:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def mark_checkpoint_complete(path, global_step: int, epoch: float | None = None) -> dict:
    """Write the completion marker of a checkpoint whose files are all written: its step and
    every file (relative path) with its size."""
    path = Path(path)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
             if f.is_file() and f.name != CHECKPOINT_MARKER and not f.name.startswith(".")}
    marker = {"global_step": int(global_step), "epoch": epoch, "files": files}
    atomic_write_json(path / CHECKPOINT_MARKER, marker)
    return marker


def checkpoint_complete(path) -> tuple[bool, str]:
    """Whether a checkpoint folder can be resumed from, and why not: its marker is valid, names
    this step, lists the trainer state, the weights, the optimizer and the scheduler, and every
    file it lists is there with the size it had when the save finished."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

    path = Path(path)
    try:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return False, "no completion marker (the save did not finish)"
    except (ValueError, KeyError, TypeError):
        return False, "unreadable completion marker"
    if marker.get("global_step") != _checkpoint_step(path):
        return False, f"the marker names step {marker.get('global_step')}"
    weights = [f for f in files if Path(f).name.startswith(("model", "adapter_model", "pytorch_model"))
               and f.endswith((".safetensors", ".bin", ".index.json"))]
    for need, present in ((TRAINER_STATE_NAME, TRAINER_STATE_NAME in files), ("the weights", bool(weights)),
                          (OPTIMIZER_NAME, OPTIMIZER_NAME in files), (SCHEDULER_NAME, SCHEDULER_NAME in files)):
        if not present:
            return False, f"{need} missing from the marker"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return False, f"{rel} is missing"
        if f.stat().st_size != size:
            return False, f"{rel} has {f.stat().st_size} bytes, {size} when saved"
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except ValueError:
        return False, f"{TRAINER_STATE_NAME} is unreadable"
    if state.get("global_step") != marker["global_step"]:
        return False, f"{TRAINER_STATE_NAME} is at step {state.get('global_step')}"
    return True, "complete"


def latest_complete_checkpoint(ckpt_dir, log=None) -> Path | None:
    """The complete checkpoint with the highest step under ``ckpt_dir`` (None if there is none);
    the incomplete ones newer than it are reported through ``log``."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    ckpts = sorted((p for p in d.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) is not None),
                   key=_checkpoint_step, reverse=True)
    for p in ckpts:
        ok, why = checkpoint_complete(p)
        if ok:
            return p
        if log is not None:
            log(f"finetune: skipping {p.name}: {why}")
    return None


def _check_out_dir(model_name: str, out: Path) -> None:
    from knowcat.paths import check_output_separate

    check_output_separate([model_name], out, what="output folder")


def finetune(model_name: str, train_rows: list[dict], eval_sets: dict[str, list[dict]], out_dir,
             cfg: FinetuneConfig = FinetuneConfig(), template: str | None = None, ood_relations=(),
             device: str = "auto", log=print, progress: bool = True, ood_rule: str | None = None) -> dict:
    """Fine-tune ``model_name`` on ``train_rows`` (prompt/completion records with id and
    category) and measure it after every epoch on ``eval_sets`` (``{"dev": [...],
    "test": [...]}``: records with id, question, answers, relation and, for test,
    category). ``ood_relations``: the relations whose questions count as out-of-distribution
    (``ood_rule`` says how they were chosen; both are recorded). Returns the contents of
    ``OUT/metrics.json``."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from knowcat.mixtures import DEFAULT_TEMPLATE
    from knowcat.rundir import FinetuneDir
    from probes.loading import load_model, resolve_device

    template = template or DEFAULT_TEMPLATE
    out = Path(out_dir)
    _check_out_dir(model_name, out)
    fd = FinetuneDir(out)
    m = fd.read_metrics()
    if m is not None:
        if m.get("complete") and m.get("config") == asdict(cfg):
            log(f"finetune: already complete in {out}")
            return m
    ood = set(ood_relations)
    run_config = {"model": model_name, "config": asdict(cfg), "template": template, "n_train": len(train_rows),
                  "eval_sets": {k: len(v) for k, v in eval_sets.items()}, "ood_relations": sorted(ood),
                  "ood_rule": ood_rule}
    if fd.config.exists() and (fd.read_epochs() or fd.checkpoints.exists()):
        old = fd.read_config()
        if {k: old.get(k) for k in run_config} != json.loads(json.dumps(run_config)):
            raise ValueError(f"{out} holds a fine-tuning run with another model, configuration or data; "
                             f"remove it or use another output folder (resuming would mix the two)")
    out.mkdir(parents=True, exist_ok=True)
    fd.epochs_dir.mkdir(exist_ok=True)
    fd.write_config(run_config)
    if not eval_sets.get("dev") and int(os.environ.get("RANK", "0")) == 0:
        log(f"finetune: warning: {NO_DEV_NOTE}")
    dev = resolve_device(device)
    model, tok = load_model(model_name, device=dev, dtype="float32")
    model.train()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        from probes.loading import MODEL_BUILD_LOCK

        with MODEL_BUILD_LOCK:  # new LoRA layers are initialised through torch.nn.init, which a load patches
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets,
                                                     task_type="CAUSAL_LM"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = cfg.per_device_batch_size or max(1, cfg.batch_size // world)
    accum = max(1, math.ceil(cfg.batch_size / (per_device * world)))
    steps_per_epoch = math.ceil(len(train_rows) / (per_device * world * accum))
    args = TrainingArguments(
        output_dir=str(fd.checkpoints), num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.scheduler,
        # one checkpoint per epoch; the older ones are removed by Measure.on_save once the new one
        # is marked complete (the Trainer's own rotation would delete them before that)
        save_strategy="epoch", save_total_limit=None, eval_strategy="no", report_to="none",
        logging_strategy="steps", logging_steps=cfg.log_every or steps_per_epoch, seed=cfg.seed,
        data_seed=cfg.seed, use_cpu=dev.type == "cpu", bf16=cfg.bf16, disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False, save_only_model=False,
    )
    encoded = encode_training_set(train_rows, tok)
    every_epoch = tests_every_epoch(cfg, out.name)

    class Measure(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch = int(round(state.epoch))
            if state.is_world_process_zero and not fd.epoch(epoch).exists():
                last = epoch >= int(round(args.num_train_epochs))
                if every_epoch or last or not eval_sets.get("dev"):
                    metrics, rows = measure_epoch(model, tok, epoch, train_rows, eval_sets, template, cfg, ood)
                else:  # the test set only where EARLY_STOP may fall (the analysis reads it there)
                    rest = {k: v for k, v in eval_sets.items() if k != "test"}
                    metrics, rows = measure_epoch(model, tok, epoch, train_rows, rest, template, cfg, ood)
                    dev_acc = (metrics.get("dev") or {}).get("all", {}).get("accuracy")
                    if "test" in eval_sets and may_be_early_stop(dev_acc, [m for m in fd.read_epochs()
                                                                            if m["epoch"] < epoch]):
                        m2, rows2 = measure_epoch(model, tok, epoch, [], {"test": eval_sets["test"]}, template,
                                                  cfg, ood)
                        metrics["test"] = m2["test"]
                        metrics["seconds_measuring"] = round(metrics["seconds_measuring"] + m2["seconds_measuring"], 2)
                        rows += rows2
                losses = [h["loss"] for h in state.log_history if "loss" in h]
                metrics["train_loss"] = losses[-1] if losses else None
                fd.write_epoch(epoch, metrics, rows)

                def pct(name):
                    a = (metrics.get(name) or {}).get("all", {}).get("accuracy")
                    return "-" if a is None else f"{a:.1%}"

                log(f"epoch {epoch}: fitted {metrics['train']['fitted']:.1%}, dev {pct('dev')}, test "
                    f"{pct('test')} ({metrics['seconds_measuring']:.0f} s measuring)")
            if world > 1:
                torch.distributed.barrier()

        def on_save(self, args, state, control, **kw):
            # every process has written its part of the checkpoint (its RNG state) once all reach here
            if world > 1:
                torch.distributed.barrier()
            if state.is_world_process_zero:
                ckpt = ckpt_dir / f"checkpoint-{state.global_step}"
                mark_checkpoint_complete(ckpt, state.global_step, state.epoch)
                for old in ckpt_dir.glob("checkpoint-*"):
                    if old != ckpt and old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
            if world > 1:
                torch.distributed.barrier()

    ckpt_dir = fd.checkpoints
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(encoded), data_collator=_Collator(
        tok.pad_token_id), callbacks=[Measure()])
    if not progress:
        from transformers.trainer_callback import PrinterCallback
        from transformers.utils import logging as hf_logging

        trainer.remove_callback(PrinterCallback)
        hf_logging.disable_progress_bar()
    is_main = trainer.is_world_process_zero()
    resume = latest_complete_checkpoint(ckpt_dir, log=log if is_main else None)
    if world > 1:  # every process resumes from the checkpoint rank 0 chose, or all start afresh
        box = [str(resume) if resume else None]
        torch.distributed.broadcast_object_list(box, src=0)
        resume = Path(box[0]) if box[0] else None
    if is_main and ckpt_dir.exists():  # incomplete saves are never resumed from: remove them
        for p in ckpt_dir.glob("checkpoint-*"):
            if p != resume and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    t = time.time()
    if resume:
        log(f"finetune: resuming from {resume.name}")
    elif fd.read_epochs():
        log("finetune: no complete checkpoint; training again from the start (measured epochs are kept)")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - t
    if not trainer.is_world_process_zero():
        return {}
    if cfg.save_model:
        trainer.save_model(str(fd.model))
        tok.save_pretrained(str(fd.model))
    epochs = fd.read_epochs()
    result = {"complete": True, "config": asdict(cfg), "model": model_name, "n_train": len(train_rows),
              "world_size": trainer.args.world_size, "ood_relations": sorted(ood), "ood_rule": ood_rule,
              "seconds_training": round(seconds, 1), **choose_stops(epochs), "epochs": epochs}
    fd.write_metrics(result)
    shutil.rmtree(fd.checkpoints, ignore_errors=True)
    return result


def eval_items(records: list[dict], split: str | None = None) -> list[dict]:
    """Evaluation records (id, question, answers, relation, category) from categorized or
    plain records."""
    out = []
    for r in records:
        if split is not None and r.get("split") != split:
            continue
        ans = r["answers"]
        out.append({"id": r["id"], "question": r["question"], "answers": [ans] if isinstance(ans, str) else ans,
                    "relation": r.get("relation"), "category": r.get("category")})
    return out


def format_epochs(m: dict) -> str:
    lines = [f"{'epoch':>5}{'fitted':>8}" + "".join(f"{c[:2]:>6}" for c in CATEGORIES) + f"{'dev':>7}{'test':>7}"]
    for e in m["epochs"]:
        fb = e["train"]["fitted_by_category"]
        lines.append(f"{e['epoch']:>5}{e['train']['fitted']:>8.1%}" +
                     "".join(f"{fb[c]:>6.0%}" if c in fb else f"{'-':>6}" for c in CATEGORIES) +
                     f"{e.get('dev', {}).get('all', {}).get('accuracy') or 0:>7.1%}"
                     f"{e.get('test', {}).get('all', {}).get('accuracy') or 0:>7.1%}")
    if m.get("early_stop") is not None:
        lines.append(f"EARLY_STOP = epoch {m['early_stop']}, CONVERGENCE = epoch {m['convergence']}")
    elif "convergence" in m:
        lines.append(f"EARLY_STOP undefined (no dev set), CONVERGENCE = epoch {m['convergence']}")
    return "\n".join(lines)


__all__ = ["FinetuneConfig", "finetune", "read_epochs", "choose_stops", "eval_items", "format_epochs",
           "encode_training_set", "answer_prompts", "score_answers", "checkpoint_complete",
           "latest_complete_checkpoint", "mark_checkpoint_complete", "NO_DEV_NOTE"]
