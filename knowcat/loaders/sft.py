"""SFT datasets as people keep them: read the question/answer turns, write records back as they were.

Formats (auto-detected from a record's fields, or forced with ``format=``):

- ``messages``: TRL conversational, ``{"messages": [{"role", "content"}, ...]}``;
- ``prompt_completion``: TRL, ``prompt`` and ``completion`` as strings or as message lists;
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` (``human``/``gpt``/``system``),
  with an optional top-level ``system``;
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[instruction, response]`` pairs);
- ``qa``: plain ``question`` / ``answers`` (or ``answer``) records.

Every format is read into one conversation (system, then alternating user / assistant
turns, each with the field it came from). A *turn* is one assistant message: its question
is the user message before it, rendered with the system prompt and the earlier turns as
context; its reference answer is the assistant's text. By default only the last assistant
turn of a record is asked (``turns="last"``); ``turns="all"`` asks each.

Records pass through untouched: the output of :func:`annotate` is the input record, in its
own field order, with knowcat's fields under one key (:data:`META_KEY`). Malformed records
(no assistant turn, non-string content, roles out of order, an unknown role) raise
:class:`~knowcat.errors.DataError` naming file, record and field, or with ``on_error="skip"``
become rejects with that reason; no record is ever dropped silently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.io import atomic_write_text

SFT_FORMATS = ("messages", "prompt_completion", "sharegpt", "alpaca", "qa")
FORMAT_ALIASES = {"trl": "messages", "chat": "messages", "prompt-completion": "prompt_completion",
                  "conversations": "sharegpt", "sharegpt": "sharegpt", "alpaca": "alpaca", "qa": "qa",
                  "messages": "messages", "prompt_completion": "prompt_completion"}
CONTAINERS = ("jsonl", "json", "parquet", "hf")
META_KEY = "knowcat"
TURN_MODES = ("last", "all")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    text: str
    field: str  # where in the record the text is, e.g. "messages[3].content"


@dataclass
class Turn:
    """One assistant turn: ``question`` (user message with its context) and the reference ``answers``."""

    index: int  # 0-based position among the record's assistant turns
    question: str
    answers: list[str]
    field: str


@dataclass
class SFTRecord:
    number: Any  # the record number in its file (line for JSONL, position otherwise)
    record: dict
    format: str
    turns: list[Turn] = field(default_factory=list)


def normalize_format(name: str | None) -> str | None:
    if name is None:
        return None
    key = name.lower().replace("-", "_")
    fmt = FORMAT_ALIASES.get(key) or FORMAT_ALIASES.get(name.lower())
    if fmt is None:
        raise ValueError(f"unknown SFT format {name!r}; expected one of {SFT_FORMATS}")
    return fmt


def detect_record_format(rec: Any) -> str | None:
    """The SFT format a record's fields say, or None."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "question" in rec and ("answers" in rec or "answer" in rec):
        return "qa"
    return None


def is_chat_format(fmt: str | None) -> bool:
    return fmt is not None and fmt != "qa"


# --- reading records -------------------------------------------------------------------------

def container_of(path) -> str:
    p = Path(path)
    if p.is_dir():
        return "hf"
    suf = p.suffix.lower()
    if suf in (".jsonl", ".ndjson"):
        return "jsonl"
    if suf == ".json":
        return "json"
    if suf in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"unknown file type {suf!r}; SFT data is read from .jsonl, .json, .parquet "
                    f"or a folder saved by datasets", file=path)


def iter_raw(path) -> Iterator:
    """``RawRecord`` s of a JSONL / JSON / Parquet file or a saved HF dataset (one split, or every split
    of a ``DatasetDict`` in turn, numbered ``split:row``)."""
    from knowcat.loaders.readers import READERS, RawRecord

    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", file=path)
    kind = container_of(path)
    if kind != "hf":
        yield from READERS[kind](path)
        return
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"not a dataset saved by datasets.save_to_disk: {e}", file=path) from None
    parts = list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, part in parts:
        for n, row in enumerate(part):
            num = n if split is None else f"{split}:{n}"
            yield RawRecord(num, value=row, raw=row)


def sniff_format(path, max_records: int = 20) -> str | None:
    """The SFT format of the first records of ``path`` (None when they look like none)."""
    try:
        for i, rr in enumerate(iter_raw(path)):
            if rr.error is None:
                fmt = detect_record_format(rr.value)
                if fmt is not None:
                    return fmt
            if i >= max_records:
                break
    except DataError:
        return None
    return None


# --- one record -> its conversation ----------------------------------------------------------

def _text(value: Any, fld: str, err: dict) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"{type(value).__name__}"
        raise DataError(f"expected string content, got {kind}", field=fld, **err)
    return value


def _messages(msgs: Any, fld: str, err: dict, role_key: str, text_key: str, roles: dict | None) -> list[Message]:
    if not isinstance(msgs, list):
        got = "missing" if msgs is None else type(msgs).__name__
        raise DataError(f"expected a list of messages, got {got}", field=fld, **err)
    out = []
    for i, m in enumerate(msgs):
        here = f"{fld}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"expected a message object, got {type(m).__name__}", field=here, **err)
        role = m.get(role_key)
        if not isinstance(role, str):
            raise DataError(f"message has no '{role_key}'", field=f"{here}.{role_key}", **err)
        mapped = roles.get(role.lower()) if roles is not None else (role if role in _ROLES else None)
        if mapped is None:
            raise DataError(f"unknown role {role!r}; expected one of "
                            f"{sorted(roles) if roles is not None else list(_ROLES)}", field=f"{here}.{role_key}", **err)
        out.append(Message(mapped, _text(m.get(text_key), f"{here}.{text_key}", err), f"{here}.{text_key}"))
    return out


def conversation(rec: Any, fmt: str, err: dict) -> list[Message]:
    """The record as one conversation: an optional system message, then user/assistant messages."""
    if not isinstance(rec, dict):
        raise DataError(f"expected a JSON object, got {type(rec).__name__}", **err)
    if fmt == "messages":
        return _messages(rec.get("messages"), "messages", err, "role", "content", None)
    if fmt == "sharegpt":
        conv = _messages(rec.get("conversations"), "conversations", err, "from", "value", _SHAREGPT_ROLES)
        if rec.get("system") not in (None, ""):
            conv.insert(0, Message("system", _text(rec["system"], "system", err), "system"))
        return conv
    if fmt == "prompt_completion":
        conv = []
        p, c = rec.get("prompt"), rec.get("completion")
        if isinstance(p, list):
            conv += _messages(p, "prompt", err, "role", "content", None)
        else:
            conv.append(Message("user", _text(p, "prompt", err), "prompt"))
        if isinstance(c, list):
            comp = _messages(c, "completion", err, "role", "content", None)
            if not comp or any(m.role != "assistant" for m in comp):
                raise DataError("a conversational completion must hold assistant messages only", field="completion", **err)
            conv += comp
        else:
            conv.append(Message("assistant", _text(c, "completion", err), "completion"))
        return conv
    if fmt == "alpaca":
        conv = []
        if rec.get("system") not in (None, ""):
            conv.append(Message("system", _text(rec["system"], "system", err), "system"))
        hist = rec.get("history")
        if hist not in (None, ""):
            if not isinstance(hist, list):
                raise DataError(f"expected a list of [instruction, response] pairs, got {type(hist).__name__}",
                                field="history", **err)
            for i, pair in enumerate(hist):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise DataError("expected an [instruction, response] pair", field=f"history[{i}]", **err)
                conv.append(Message("user", _text(pair[0], f"history[{i}][0]", err), f"history[{i}][0]"))
                conv.append(Message("assistant", _text(pair[1], f"history[{i}][1]", err), f"history[{i}][1]"))
        instr = _text(rec.get("instruction"), "instruction", err)
        inp = rec.get("input")
        if inp not in (None, ""):
            instr = f"{instr}\n{_text(inp, 'input', err)}"
        conv.append(Message("user", instr, "instruction"))
        conv.append(Message("assistant", _text(rec.get("output"), "output", err), "output"))
        return conv
    if fmt == "qa":
        return [Message("user", _text(rec.get("question"), "question", err), "question")]
    raise ValueError(f"unknown SFT format {fmt!r}")


def check_order(conv: list[Message], err: dict) -> None:
    """System only first; then user, assistant, user, assistant ... ; at least one assistant turn."""
    expect = "user"
    for i, m in enumerate(conv):
        if m.role == "system":
            if i != 0:
                raise DataError("a system message after the start of the conversation", field=m.field, **err)
            continue
        if m.role != expect:
            raise DataError(f"roles out of order: a {m.role} message where a {expect} message was due",
                            field=m.field, **err)
        expect = "assistant" if expect == "user" else "user"
    if not any(m.role == "assistant" for m in conv):
        raise DataError("no assistant turn: nothing to use as the reference answer", **err)


def render_question(context: list[Message], user: Message) -> str:
    """The question text of one turn: the system prompt and the earlier turns as context, then the user's message."""
    parts = []
    for m in context:
        if m.role == "system":
            parts.append(f"System: {m.text}")
        else:
            parts.append(f"{'User' if m.role == 'user' else 'Assistant'}: {m.text}")
    if not parts:
        return user.text
    return "\n".join(parts + [f"User: {user.text}"])


def parse_record(rec: Any, fmt: str, turns: str = "last", *, file=None, number=None) -> SFTRecord:
    """One record's turns (``turns``: ``"last"`` or ``"all"``); DataError on a malformed record."""
    if turns not in TURN_MODES:
        raise ValueError(f"turns must be one of {TURN_MODES}, got {turns!r}")
    err = {"file": file, "record": number}
    if fmt == "qa":
        from knowcat.loaders.fields import parse_answers

        conv = conversation(rec, fmt, err)
        name = "answers" if "answers" in rec else "answer"
        answers = parse_answers(rec.get(name), name, err)
        if not conv[0].text.strip():
            raise DataError("empty string", field="question", **err)
        return SFTRecord(number, rec, fmt, [Turn(0, conv[0].text, answers, name)])
    conv = conversation(rec, fmt, err)
    check_order(conv, err)
    out = []
    k = 0
    for i, m in enumerate(conv):
        if m.role != "assistant":
            continue
        user = conv[i - 1]
        if not user.text.strip():
            raise DataError("empty user message", field=user.field, **err)
        if not m.text.strip():
            raise DataError("empty assistant message", field=m.field, **err)
        out.append(Turn(k, render_question(conv[:i - 1], user), [m.text], m.field))
        k += 1
    if turns == "last":
        out = out[-1:]
    return SFTRecord(number, rec, fmt, out)


# --- a whole dataset -------------------------------------------------------------------------

@dataclass
class SFTDataset:
    path: Path
    format: str
    container: str
    records: list[SFTRecord]  # the records that parsed, in file order
    rejects: list[dict]  # {"record", "field", "reason", "raw"} of those that did not

    def examples(self, group_by: str | None = None) -> list[QAExample]:
        """One :class:`QAExample` per turn; ``relation`` is the ``group_by`` field's value (``"default"``
        without it), ``metadata["sft"]`` locates the turn (record position and turn index). The id is the
        record's ``id`` field when it has one (``<id>#turn<i>`` when several are asked), else a
        content id; repeated ids get ``-2``, ``-3`` ...."""
        make = TurnExamples(group_by, self.path)
        return [ex for pos, r in enumerate(self.records) for ex in make(pos, r)]


class TurnExamples:
    """The examples of each record's turns, record after record (what :meth:`SFTDataset.examples` and
    :func:`scan_sft` give): ids made unique over the records seen so far."""

    def __init__(self, group_by: str | None, path=None, repeated: frozenset | None = None, hashes=None):
        # repeated: the hashes of the ids that occur more than once (only those are counted: the others are
        # unique already); hashes: an array that collects every id's hash (a first pass, to find them)
        self.group_by, self.path, self.seen = group_by, path, {}
        self.repeated, self.hashes = repeated, hashes

    def __call__(self, pos: int, r: SFTRecord) -> list[QAExample]:
        from knowcat.examples import content_id

        rel = "default"
        if self.group_by is not None:
            v = r.record.get(self.group_by)
            if v is None or isinstance(v, (dict, list)):
                raise DataError(f"--group-by: expected a scalar value, got {type(v).__name__}",
                                file=self.path, record=r.number, field=self.group_by)
            rel = str(v)
        rid = r.record.get("id")
        rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip() else None
        out = []
        for t in r.turns:
            if rid is not None:  # the record's own id (per turn when several are asked)
                base = rid if len(r.turns) == 1 else f"{rid}#turn{t.index}"
            else:
                base = content_id(rel, t.question, t.answers)
            if self.hashes is not None:
                self.hashes.append(_base_hash(base))
            if self.repeated is None or _base_hash(base) in self.repeated:
                n = self.seen.get(base, 0) + 1
                self.seen[base] = n
            else:
                n = 1
            out.append(QAExample(id=base if n == 1 else f"{base}-{n}", relation=rel, question=t.question,
                                 answers=list(t.answers), metadata={"sft": {"record": pos, "turn": t.index,
                                                                           "field": t.field}}))
        return out


def _base_hash(base: str) -> int:
    """A stable 64-bit hash of an id (two ids of one hash are only counted, never confused)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(base.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def iter_sft(path, format: str | None = None, turns: str = "last", on_error: str = "raise",
             rejects: list | None = None, info: dict | None = None) -> Iterator[SFTRecord]:
    """The records of an SFT file that parse, one at a time, in file order (:func:`load_sft` without holding
    them). The format is the one forced, else the first record's that names one (``info["format"]``, once
    known). Bad records raise, or with ``on_error="skip"`` are appended to ``rejects`` with their reason."""
    from knowcat.loaders.rejects import raw_text

    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    path = Path(path)
    fmt = normalize_format(format)

    def reject(e: DataError, raw):
        if on_error == "raise":
            raise e
        if rejects is not None:
            rejects.append({"record": e.record, "field": e.field, "reason": e.reason, "raw": raw_text(raw)})

    for rr in iter_raw(path):
        if rr.error is not None:
            reject(rr.error, rr.raw)
            continue
        if fmt is None:
            fmt = detect_record_format(rr.value)
            if fmt is None:
                keys = sorted(rr.value) if isinstance(rr.value, dict) else type(rr.value).__name__
                raise DataError(f"cannot tell the SFT format from the fields {keys}; expected messages, "
                                f"prompt+completion, conversations, instruction+output or question+answers "
                                f"(or force one with --format)", file=path, record=rr.record)
        if info is not None:
            info["format"] = fmt
        try:
            rec = parse_record(rr.value, fmt, turns, file=path, number=rr.record)
        except DataError as e:
            reject(e, rr.raw)
            continue
        yield rec
    if fmt is None:
        raise DataError("no records", file=path)
    if info is not None:
        info["format"] = fmt


def load_sft(path, format: str | None = None, turns: str = "last", on_error: str = "raise") -> SFTDataset:
    """Read an SFT file (or saved HF dataset). ``format``: one of :data:`SFT_FORMATS` (default: detected
    from the first record that names one). Bad records raise, or with ``on_error="skip"`` go to
    ``SFTDataset.rejects`` with their reason."""
    path = Path(path)
    rejects: list[dict] = []
    info: dict = {}
    records = list(iter_sft(path, format, turns, on_error, rejects, info))
    return SFTDataset(path, info["format"], container_of(path), records, rejects)


@dataclass
class SFTScan:
    """An SFT file read for its turns, records not kept (:func:`scan_sft`): enough to ask every turn and,
    with :func:`knowcat.sft.annotated_stream` and :func:`write_sft_stream`, to write the records back annotated."""

    path: Path
    format: str
    container: str
    n_records: int  # records that parsed
    examples: list[QAExample]  # one per asked turn, in record order (``metadata["sft"]["record"]``: position)
    rejects: list[dict]
    turns: str = "last"
    rejected: frozenset = frozenset()  # record numbers of the rejects


def scan_sft(path, format: str | None = None, turns: str = "last", on_error: str = "raise",
             group_by: str | None = None, stream: bool = False) -> SFTScan:
    """The turns of an SFT file as examples, streamed: each record is parsed, turned into its examples
    and let go, so memory holds the examples, not the records. With ``stream`` not even the examples:
    ``examples`` is then a :class:`StreamedExamples`, the file read again on each pass."""
    path = Path(path)
    rejects: list[dict] = []
    info: dict = {}
    if stream:
        from array import array

        import numpy as np

        hashes = array("q")
        make = TurnExamples(group_by, path, hashes=hashes)
        n = n_ex = 0
        for r in iter_sft(path, format, turns, on_error, rejects, info):
            n_ex += len(make(n, r))
            n += 1
        h = np.frombuffer(hashes, np.int64)
        h.sort()  # in place: the hashes that occur more than once are side by side
        repeated = frozenset(int(x) for x in h[1:][h[1:] == h[:-1]])
        del h, hashes
        examples = StreamedExamples(path, info["format"], turns, group_by, n_ex, repeated)
    else:
        make = TurnExamples(group_by, path)
        examples, n = [], 0
        for r in iter_sft(path, format, turns, on_error, rejects, info):
            examples += make(n, r)
            n += 1
    return SFTScan(path, info["format"], container_of(path), n, examples, rejects, turns,
                   frozenset(r["record"] for r in rejects))


class StreamedExamples:
    """The examples of an SFT file's turns (those :func:`scan_sft` gives, the same ids), read again from the
    file on each pass instead of held: memory holds one record and the ids that occur more than once.
    Sized and re-iterable; ``where(keep)``: those for which ``keep(example)`` is true (counted in one pass);
    ``without(ids)``: the same less some."""

    def __init__(self, path, format: str, turns: str, group_by: str | None, n: int, repeated: frozenset,
                 keep=None, total: int | None = None):
        self.path, self.format, self.turns, self.group_by = Path(path), format, turns, group_by
        self.n, self.repeated, self.keep = n, repeated, keep
        self.total = n if total is None else total  # every turn of the file, kept or not

    def __len__(self) -> int:
        return self.n

    def where(self, keep) -> "StreamedExamples":
        both = keep if self.keep is None else (lambda ex, a=self.keep: a(ex) and keep(ex))
        n = sum(1 for ex in self if keep(ex))
        return StreamedExamples(self.path, self.format, self.turns, self.group_by, n, self.repeated, both,
                                self.total)

    def without(self, ids) -> "StreamedExamples":
        ids = frozenset(ids)
        return self.where(lambda ex: ex.id not in ids)

    def __iter__(self):
        make = TurnExamples(self.group_by, self.path, repeated=self.repeated)
        n = 0
        # the records that failed the scan are skipped again (the scan raised or recorded them)
        for pos, r in enumerate(iter_sft(self.path, self.format, self.turns, on_error="skip")):
            for ex in make(pos, r):
                n += 1
                if self.keep is None or self.keep(ex):
                    yield ex
        if n != self.total:
            raise DataError(f"the file changed while it was read: {n} turns, {self.total} when it was scanned",
                            file=self.path)


def scanned_records(scan: SFTScan) -> Iterator[dict]:
    """The records :func:`scan_sft` kept (those that parsed), read again from its file, in order: record
    ``i`` is the one whose turns are the examples with ``metadata["sft"]["record"] == i``."""
    for rr in iter_raw(scan.path):
        if rr.error is None and rr.record not in scan.rejected:
            yield rr.value


# --- writing back ----------------------------------------------------------------------------

def annotate(rec: dict, meta: dict) -> dict:
    """``rec`` unchanged, in its own field order, with ``meta`` under :data:`META_KEY` (replacing an older one)."""
    out = {k: v for k, v in rec.items() if k != META_KEY}
    out[META_KEY] = meta
    return out


def strip_meta(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != META_KEY}


PARQUET_BATCH = 1024  # rows per Parquet row group when records are streamed


def write_sft(path, records: list[dict], container: str | None = None) -> None:
    """Write records atomically as JSONL, JSON, Parquet (by suffix) or a saved HF dataset (a folder).
    JSON, Parquet and HF datasets go through the streamed writers of :func:`write_sft_stream`, so both
    give the same output."""
    path = Path(path)
    kind = container or ("hf" if not path.suffix else container_of(path))
    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif kind in ("json", "parquet", "hf"):
        write_sft_stream(path, iter(records), kind)
    else:
        raise ValueError(f"unknown container {kind!r}; expected one of {CONTAINERS}")


def _atomic_text_stream(path: Path, write) -> int:
    """Run ``write(f)`` on a temporary file beside ``path``, renamed to ``path`` when it returns; on any
    error or interrupt the temporary file is removed and ``path`` is left as it was."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def _write_jsonl(f, records) -> int:
    n = 0
    for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
        n += 1
    return n


def _write_json_array(f, records) -> int:
    """The bytes of ``json.dumps(list(records), ensure_ascii=False, indent=1) + "\\n"``, one record at a
    time (JSON escapes newlines inside strings, so indenting each line of a record is exact)."""
    n = 0
    f.write("[")
    for r in records:
        f.write(",\n" if n else "\n")
        f.write("\n".join(" " + line for line in json.dumps(r, ensure_ascii=False, indent=1).split("\n")))
        n += 1
    f.write("\n]\n" if n else "]\n")
    return n


def _batches(records, size: int):
    batch = []
    for r in records:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_text(values) -> list:
    return [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]


def _arrow_batch(batch: list[dict], names, json_cols, schema=None):
    """A pyarrow table of ``batch``, columns ``names`` (absent keys are null): the ``json_cols`` as JSON
    text, the others with their type inferred from their values (or ``schema``'s). Columns whose values
    share no Arrow type are returned as ``(None, [their names])``."""
    import pyarrow as pa

    arrays, clash = {}, []
    for k in names:
        col = [r.get(k) for r in batch]
        if k in json_cols:
            arrays[k] = pa.array(_json_text(col), type=pa.string())
            continue
        try:
            arrays[k] = pa.array(col, type=None if schema is None else schema.field(k).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            clash.append(k)
    return (None, clash) if clash else (pa.table(arrays) if arrays else pa.table({}), [])


def _clashing_fields(a, b) -> list[str]:
    import pyarrow as pa

    out = []
    for f in b:
        if a.get_field_index(f.name) >= 0:
            try:
                pa.unify_schemas([pa.schema([a.field(f.name)]), pa.schema([f])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                out.append(f.name)
    return out


def _write_parquet_stream(path: Path, records, batch_size: int = PARQUET_BATCH, json_fallback: bool = True) -> int:
    """Parquet from an iterable, ``batch_size`` records in memory at a time. Columns are every record's
    top-level keys in the order they first appear. Each batch's schema is inferred and unified with the
    ones before (permissively: int and float give float, a null column takes the other's type, structs
    gain the fields later records add). While a batch fits the schema of the file being written it is
    appended as a row group; a batch that needs a wider schema starts a new segment, and at the end the
    segments are rewritten once, batch by batch, into the unified schema. A column whose values share no
    Arrow type (a number in one record, text in another) is stored as JSON text and named in the
    schema's metadata, as :func:`knowcat.filtering.write_records` does, so the readers give it back
    (values written before the clash as Parquet gave them: absent nested keys as null); without
    ``json_fallback`` it is a :class:`DataError`. Written to a temporary folder beside ``path`` and
    renamed at the end."""
    import os
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from knowcat.loaders.readers import JSON_COLUMNS_KEY

    def refuse(cols, first, last):
        raise DataError(f"records {first}-{last} do not fit the type of the records before them in field(s) "
                        f"{', '.join(map(repr, cols))} (Parquet and saved datasets hold one type per field)",
                        file=path)

    def with_meta(schema, cols):
        return schema.with_metadata({JSON_COLUMNS_KEY: json.dumps(sorted(cols))}) if cols else schema

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        segments: list[tuple[str, set]] = []  # (file, its JSON columns)
        names: dict = {}
        json_cols: set = set()
        seg_schema = unified = None
        n = 0
        for batch in _batches(records, batch_size):
            first, n = n, n + len(batch)
            for r in batch:
                names.update(dict.fromkeys(r))
            t, clash = _arrow_batch(batch, names, json_cols)
            if not clash and unified is not None:
                clash = _clashing_fields(unified, t.schema)
            if clash:
                if not json_fallback:
                    refuse(clash, first, n - 1)
                json_cols.update(clash)
                t, _ = _arrow_batch(batch, names, json_cols)
                if unified is not None:
                    unified = pa.schema([pa.field(f.name, pa.string()) if f.name in json_cols else f
                                         for f in unified])
            unified = t.schema if unified is None else \
                pa.unify_schemas([unified, t.schema], promote_options="permissive")
            if writer is not None:
                fits = pa.unify_schemas([seg_schema, t.schema], promote_options="permissive") \
                    if not _clashing_fields(seg_schema, t.schema) else None
                if fits is not None and fits.equals(seg_schema) and json_cols == segments[-1][1]:
                    if not t.schema.equals(seg_schema):
                        t, _ = _arrow_batch(batch, seg_schema.names, json_cols, seg_schema)
                else:
                    writer.close()
                    writer = None
            if writer is None:
                seg_schema = with_meta(t.schema, json_cols)
                segments.append((os.path.join(tmpdir, f"{len(segments)}.parquet"), set(json_cols)))
                writer = pq.ParquetWriter(segments[-1][0], seg_schema)
            writer.write_table(t.replace_schema_metadata(seg_schema.metadata))
        if writer is not None:
            writer.close()
            writer = None
        final = os.path.join(tmpdir, "out.parquet")
        if not segments:
            pq.write_table(pa.table({}), final)
        elif len(segments) == 1:
            final = segments[0][0]
        else:
            unified = with_meta(unified, json_cols)
            with pq.ParquetWriter(final, unified) as w:
                for seg, seg_json in segments:
                    for b in pq.ParquetFile(seg).iter_batches(batch_size=batch_size):
                        rows = b.to_pylist()
                        for col in json_cols - seg_json:
                            for r in rows:
                                r[col] = None if r.get(col) is None else json.dumps(r[col], ensure_ascii=False)
                        w.write_table(pa.Table.from_pylist(rows, schema=unified))
        os.replace(final, path)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return n


def write_sft_stream(path, records: Iterable[dict], container: str | None = None,
                     batch_size: int = PARQUET_BATCH) -> int:
    """:func:`write_sft` from an iterable, atomically. JSONL and JSON arrays are written record by record
    to a temporary file, then renamed (memory holds one record); Parquet and saved HF datasets
    ``batch_size`` records at a time (:func:`_write_parquet_stream`, :func:`_write_hf_stream`).
    Returns the count."""
    path = Path(path)
    kind = container or ("hf" if not path.suffix else container_of(path))
    if kind == "jsonl":
        return _atomic_text_stream(path, lambda f: _write_jsonl(f, records))
    if kind == "json":
        return _atomic_text_stream(path, lambda f: _write_json_array(f, records))
    if kind == "parquet":
        return _write_parquet_stream(path, records, batch_size)
    if kind == "hf":
        return _write_hf_stream(path, records, batch_size)
    raise ValueError(f"unknown container {kind!r}; expected one of {CONTAINERS}")


def _write_hf_stream(path: Path, records, batch_size: int = PARQUET_BATCH) -> int:
    """A folder saved by ``datasets.Dataset.save_to_disk`` from an iterable, with bounded memory: the
    records go through :func:`_write_parquet_stream` (one schema for all), are copied batch by batch into
    an Arrow file that ``datasets`` memory-maps, and that dataset is saved to a temporary folder renamed
    to ``path``."""
    import shutil
    import tempfile

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        n = _write_parquet_stream(work / "rows.parquet", records, batch_size, json_fallback=False)
        if n:
            pf = pq.ParquetFile(work / "rows.parquet")
            with pa.OSFile(str(work / "rows.arrow"), "wb") as sink, \
                    pa.ipc.new_stream(sink, pf.schema_arrow) as w:
                for b in pf.iter_batches(batch_size=batch_size):
                    w.write_batch(b)
            ds = datasets.Dataset.from_file(str(work / "rows.arrow"))
        else:
            ds = datasets.Dataset.from_list([])
        (work / "rows.parquet").unlink()
        ds.save_to_disk(str(work / "saved"))
        del ds
        if path.exists():
            shutil.rmtree(path)
        (work / "saved").replace(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return n


def set_answer(rec: dict, fmt: str, turn_field: str, text: str) -> dict:
    """A copy of ``rec`` whose answer at ``turn_field`` (as :class:`Turn` names it) is ``text``;
    the original answer is kept in ``META_KEY.original_answer`` by the caller."""
    import copy

    out = copy.deepcopy(rec)
    if fmt == "qa":
        old = out.get(turn_field)
        out[turn_field] = text if isinstance(old, str) else [text]
        return out
    steps = re.findall(r"[^.\[\]]+|\[\d+\]", turn_field)
    node = out
    for s in steps[:-1]:
        node = node[int(s[1:-1])] if s.startswith("[") else node[s]
    last = steps[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = text
    else:
        node[last] = text
    return out


def write_rejects(path, rejects: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects))
