"""Field mapping and validation: one raw record (a dict) -> one :class:`QAExample`.

Every loader funnels its records through :func:`to_example`, so every format
gets the same checks and the same error messages (file, record, field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields as dc_fields
from functools import cached_property
from typing import Any, Mapping

from knowcat.errors import DataError
from knowcat.examples import QAExample


@dataclass(frozen=True)
class FieldMap:
    """Which field of a record holds which part of an example.

    ``question`` and ``answers`` are required in every record; ``id``,
    ``relation``, ``subject`` and ``split`` are read when the record has them
    (set one to ``None`` to never read it: the field then goes to metadata).
    Every field not named here is carried into ``QAExample.metadata``.
    """

    id: str | None = "id"
    relation: str | None = "relation"
    question: str = "question"
    answers: str = "answers"
    subject: str | None = "subject"
    split: str | None = "split"

    @classmethod
    def coerce(cls, fields: "FieldMap | Mapping[str, str | None] | None") -> "FieldMap":
        """Accept a FieldMap, a dict of overrides (``{"question": "q"}``) or None."""
        if fields is None:
            return cls()
        if isinstance(fields, cls):
            return fields
        if isinstance(fields, Mapping):
            known = {f.name for f in dc_fields(cls)}
            unknown = set(fields) - known
            if unknown:
                raise ValueError(f"unknown FieldMap keys {sorted(unknown)}; known: {sorted(known)}")
            return cls(**dict(fields))
        raise TypeError(f"fields must be a FieldMap or a dict, not {type(fields).__name__}")

    def names(self) -> frozenset[str]:
        """The record fields this map consumes (the rest go to metadata)."""
        return self._names

    @cached_property
    def _names(self) -> frozenset[str]:
        return frozenset(getattr(self, f.name) for f in dc_fields(self) if getattr(self, f.name) is not None)


def _is_missing(value: Any) -> bool:
    """None and float NaN (pandas' empty cell) count as absent."""
    return value is None or (isinstance(value, float) and value != value)


def has_bad_text(s: str) -> bool:
    """True when ``s`` holds lone surrogates: undecodable bytes read with surrogateescape."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def find_bad_text(value: Any, path: str = "") -> str | None:
    """The field path of the first string (key or value) that is not valid UTF-8, or None."""
    if isinstance(value, str):
        return (path or "<value>") if has_bad_text(value) else None
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
            return None
        except UnicodeDecodeError:
            return path or "<value>"
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and has_bad_text(k):
                return sub
            hit = find_bad_text(v, sub)
            if hit:
                return hit
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            hit = find_bad_text(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _text(value: Any, field: str, err: dict, *, required: bool) -> str | None:
    """A string field: bytes decoded, missing/empty checked, other types refused."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"invalid UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start})", field=field, **err) from None
    if _is_missing(value):
        if required:
            raise DataError("missing required field", field=field, **err)
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {_short(value)}", field=field, **err)
    if has_bad_text(value):
        raise DataError("invalid UTF-8 bytes in the text", field=field, **err)
    if required and not value.strip():
        raise DataError("empty string", field=field, **err)
    return value


def _short(value: Any, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_answers(value: Any, field: str, err: dict, *, answers_sep: str | None = None,
                  json_cells: bool = False) -> list[str]:
    """Gold aliases from a list of strings or one string.

    With ``json_cells`` (CSV) a string that looks like a JSON list is parsed as
    one; with ``answers_sep`` a string is split on it. Every alias must be a
    non-empty, non-whitespace string and there must be at least one.
    """
    if isinstance(value, bytes):
        value = _text(value, field, err, required=True)
    if _is_missing(value):
        raise DataError("missing required field", field=field, **err)
    if isinstance(value, str):
        if has_bad_text(value):
            raise DataError("invalid UTF-8 bytes in the text", field=field, **err)
        s = value.strip()
        if json_cells and s.startswith("[") and s.endswith("]"):
            try:
                value = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"cell looks like a JSON list but is not valid JSON ({e.msg})", field=field, **err) from None
            if not isinstance(value, list):
                raise DataError("expected a JSON list of strings", field=field, **err)
        elif answers_sep:
            value = [a.strip() for a in value.split(answers_sep)]
        else:
            value = [value]
    elif hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy arrays from pandas/pyarrow
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of strings or a string, got {type(value).__name__} {_short(value)}",
                        field=field, **err)
    if not value:
        raise DataError("empty list of answers", field=field, **err)
    out = []
    for i, a in enumerate(value):
        if isinstance(a, bytes):
            a = _text(a, f"{field}[{i}]", err, required=False)
        if not isinstance(a, str):
            raise DataError(f"answer {i} is {type(a).__name__} {_short(a)}, expected a string", field=field, **err)
        if has_bad_text(a):
            raise DataError(f"answer {i}: invalid UTF-8 bytes in the text", field=field, **err)
        if not a.strip():
            raise DataError(f"answer {i} is empty or whitespace", field=field, **err)
        out.append(a)
    return out


def json_value(value: Any, path: str, err: dict) -> Any:
    """``value`` as plain JSON values, so every output format can write it and read it back: NaN and
    infinities become null (JSON has neither), tuples and arrays lists, dates ISO text; a type with no
    JSON form is a bad record naming the field."""
    import datetime
    import decimal

    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DataError(f"a mapping key is {type(k).__name__} {_short(k)}; JSON keys are strings",
                                field=path, **err)
            out[k] = json_value(v, f"{path}.{k}", err)
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{path}[{i}]", err) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy arrays and scalars from pandas / pyarrow
        return json_value(value.tolist(), path, err)
    if isinstance(value, bytes):
        return _text(value, path, err, required=False)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise DataError(f"holds a {type(value).__name__}, which has no JSON form", field=path, **err)


def to_example(raw: Any, fm: FieldMap, *, file=None, record=None, relation: str | None = None,
               split: str | None = None, answers_sep: str | None = None, json_cells: bool = False) -> QAExample:
    """Validate one record and build its example (``id`` is ``""`` when the data gives none).

    ``relation`` / ``split`` are defaults used when the record has no such field.
    Raises :class:`DataError` naming ``file``, ``record`` and the field.
    """
    err = {"file": file, "record": record}
    if not isinstance(raw, dict) and not isinstance(raw, Mapping):
        raise DataError(f"expected a JSON object / mapping, got {type(raw).__name__} {_short(raw)}", **err)
    bad_key = next((k for k in raw if isinstance(k, str) and has_bad_text(k)), None)
    if bad_key is not None:
        raise DataError("invalid UTF-8 bytes in a field name", field=bad_key, **err)

    question = _text(raw.get(fm.question), fm.question, err, required=True)
    answers = parse_answers(raw.get(fm.answers), fm.answers, err, answers_sep=answers_sep, json_cells=json_cells)

    ex_id = ""
    if fm.id is not None and not _is_missing(raw.get(fm.id)):
        v = raw[fm.id]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(f"expected a string or integer id, got {type(v).__name__} {_short(v)}", field=fm.id, **err)
        ex_id = _text(str(v), fm.id, err, required=False).strip()

    def optional(name: str | None, default: str | None) -> str | None:
        if name is None:
            return default
        v = _text(raw.get(name), name, err, required=False)
        return v if v is not None and v.strip() else default

    rel = optional(fm.relation, relation) or "default"
    consumed = fm.names()
    metadata = {k: v for k, v in raw.items() if k not in consumed}
    bad = find_bad_text(metadata) if metadata else None
    if bad is not None:
        raise DataError("invalid UTF-8 bytes in the text", field=bad, **err)
    metadata = {k: json_value(v, str(k), err) for k, v in metadata.items()}
    return QAExample(
        id=ex_id,
        relation=rel,
        question=question,
        answers=answers,
        subject=optional(fm.subject, None),
        split=optional(fm.split, split),
        metadata=metadata,
    )
