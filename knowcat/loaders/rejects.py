"""Rejected records: why each was refused, written as JSONL at the end of a load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from knowcat.errors import DataError
from knowcat.io import atomic_write_text

MAX_RAW_CHARS = 4096


def printable(s: str) -> str:
    """``s`` with undecodable bytes (lone surrogates) shown as ``\\xNN`` escapes."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_text(raw: Any, limit: int = MAX_RAW_CHARS) -> str | None:
    """The raw record as readable text, truncated to ``limit`` characters."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        s = raw.decode("utf-8", "backslashreplace")
    elif isinstance(raw, str):
        s = raw
    else:
        try:
            s = json.dumps(raw, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            s = repr(raw)
    s = printable(s)
    if len(s) > limit:
        s = s[:limit] + f"...[truncated {len(s) - limit} chars]"
    return s


class RejectWriter:
    """Collects rejected records and writes them atomically as JSONL on :meth:`close`.

    Each line: ``{"file", "record", "field", "reason", "raw"}``. One writer may be
    shared by several loader calls (pass it as ``rejects=``); the caller closes it.
    """

    def __init__(self, path, max_raw_chars: int = MAX_RAW_CHARS):
        self.path = Path(path)
        self.max_raw_chars = max_raw_chars
        self.rows: list[dict] = []
        self.closed = False

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, error: DataError, raw: Any = None) -> None:
        row = {k: (printable(v) if isinstance(v, str) else v) for k, v in error.as_reject().items()}
        row["raw"] = raw_text(raw, self.max_raw_chars)
        self.rows.append(row)

    def close(self) -> None:
        """Write the file (even when empty, so a clean run leaves an empty rejects file)."""
        lines = [json.dumps(r, ensure_ascii=False, default=str) for r in self.rows]
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))
        self.closed = True

    def __enter__(self) -> "RejectWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rejects(path) -> list[dict]:
    """Read a rejects file back."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
