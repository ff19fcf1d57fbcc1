"""Loaders for plain record files: JSON Lines, JSON (a list), CSV and Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.loaders.collect import ExampleCollector
from knowcat.loaders.fields import FieldMap
from knowcat.loaders.readers import MAX_LINE_BYTES, READERS, iter_csv
from knowcat.loaders.rejects import RejectWriter

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet"}
FORMATS = tuple(READERS)


def detect_format(path) -> str | None:
    """The format named by the file's suffix, or None."""
    return SUFFIXES.get(Path(path).suffix.lower())


def load_records(
    path,
    format: str | None = None,
    fields: FieldMap | Mapping[str, str | None] | None = None,
    relation: str | None = None,
    split: str | None = None,
    answers_sep: str | None = None,
    on_error: str = "raise",
    rejects: "str | Path | RejectWriter | None" = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[QAExample]:
    """Load QA examples from one JSONL / JSON / CSV / Parquet file.

    ``fields`` maps record fields to example fields (:class:`FieldMap` or a dict
    of overrides); every other field goes to ``metadata``. ``relation`` and
    ``split`` are used for records without such a field (relation defaults to
    ``"default"``). ``answers`` may be a list or one string; a CSV cell may hold
    a JSON list, and with ``answers_sep`` a string is split on it. CSV cells are
    read as text. Bad records raise :class:`DataError` (file, record, field), or
    with ``on_error="skip"`` are dropped and written to ``rejects``.
    Lines of JSONL (rows of CSV) longer than ``max_line_bytes`` are refused.
    """
    path = Path(path)
    fmt = _check_format(path, format)
    collector = ExampleCollector(on_error, rejects, source=path)
    collect_file(collector, path, fmt, FieldMap.coerce(fields), relation=relation, split=split,
                 answers_sep=answers_sep, max_line_bytes=max_line_bytes)
    return collector.finish()


def _check_format(path: Path, format: str | None) -> str:
    fmt = (format or detect_format(path) or "").lower()
    if fmt not in READERS:
        raise DataError(f"unknown format {format or path.suffix!r}; expected one of {FORMATS}", file=path)
    return fmt


def collect_file(collector: ExampleCollector, path: Path, fmt: str, fm: FieldMap, *, relation=None, split=None,
                 answers_sep=None, max_line_bytes: int = MAX_LINE_BYTES) -> None:
    """Read one file's records into ``collector`` (which applies the error policy)."""
    if not path.is_file():
        raise DataError("no such file" if not path.exists() else "not a file", file=path)
    if fmt == "csv":
        raws = iter_csv(path, max_line_bytes)
    else:
        raws = READERS[fmt](path, max_line_bytes)
    n = 0
    for rr in raws:
        n += 1
        if rr.error is not None:
            collector.reject(rr.error, rr.raw)
            continue
        collector.add(rr.value, fm, file=path, record=rr.record, relation=relation, split=split,
                      answers_sep=answers_sep, json_cells=fmt == "csv")
    if n == 0:
        raise DataError("empty file: it holds no records", file=path)
