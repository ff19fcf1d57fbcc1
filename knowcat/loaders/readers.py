"""Raw record readers: files -> ``RawRecord`` (a parsed record, or the error that stopped it).

Record numbers: the 1-based line number for JSONL, the 0-based position for
JSON lists, CSV data rows and Parquet rows. Undecodable bytes are read with
``surrogateescape`` so the validator can name the field that holds them.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from knowcat.errors import DataError

MAX_LINE_BYTES = 1 << 20  # 1 MiB
SNIPPET = 200
_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class RawRecord:
    """One record as read: ``value`` when it parsed, else ``error``; ``raw`` for the rejects file."""

    record: Any
    value: Any = None
    raw: Any = None
    error: DataError | None = None


def _decode(data: bytes) -> tuple[str, str | None]:
    """Text of ``data`` and, if it is not valid UTF-8, a note naming the first bad byte."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        note = f"invalid UTF-8 byte 0x{data[e.start]:02x} at line {line}"
        return data.decode("utf-8", "surrogateescape"), note


def iter_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """JSON Lines, streamed: blank lines skipped, over-long lines refused without reading them whole."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            lineno += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                total = len(line)
                while True:  # consume the rest of the line in bounded chunks
                    chunk = f.readline(1 << 20)
                    total += len(chunk)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                yield RawRecord(lineno, raw=line[:4096], error=DataError(
                    f"line {lineno} is {total} bytes, over max_line_bytes={max_line_bytes}", file=path, record=lineno))
                continue
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            text, note = _decode(line)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                extra = f"; {note.replace('line 1', f'line {lineno}')}" if note else ""
                yield RawRecord(lineno, raw=line, error=DataError(
                    f"malformed JSON at line {lineno}, column {e.colno}: {e.msg}{extra}", file=path, record=lineno))
                continue
            yield RawRecord(lineno, value=value, raw=line)


def _position(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _scan_array(text: str, path: Path) -> Iterator[RawRecord]:
    """Parse a JSON list element by element, to name the record where it breaks."""
    dec = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    i = _WS.match(text, i + 1).end()  # past '['
    n = 0
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                yield _array_error(text, path, n, e.pos, e.msg)
                return
            yield RawRecord(n, value=obj, raw=obj)
            n += 1
            i = _WS.match(text, end).end()
            if text.startswith(",", i):
                i = _WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i += 1
                break
            else:
                yield _array_error(text, path, n, i, "expected ',' or ']' after the record")
                return
    i = _WS.match(text, i).end()
    if i < len(text):
        yield _array_error(text, path, None, i, "extra data after the list")


def _array_error(text: str, path: Path, n, pos: int, msg: str) -> RawRecord:
    line, col = _position(text, pos)
    tail = "" if n is None else f"; records from {n} on are unreadable"
    return RawRecord(n, raw=text[max(0, pos - SNIPPET): pos + SNIPPET], error=DataError(
        f"malformed JSON at line {line}, column {col}: {msg}{tail}", file=path, record=n))


def iter_json(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """A JSON file holding a list of records (a ``.json`` file in JSON Lines form is read as such)."""
    data = Path(path).read_bytes()
    text, _ = _decode(data)
    i = _WS.match(text, 0).end()
    if text.startswith("{", i):
        yield from iter_jsonl(path, max_line_bytes)
        return
    if not text.startswith("[", i):
        what = "an empty file" if i >= len(text) else f"{text[i:i + 20]!r}..."
        yield RawRecord(None, error=DataError(f"expected a JSON list of records, found {what}", file=path))
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        yield from _scan_array(text, path)
        return
    for n, obj in enumerate(records):
        yield RawRecord(n, value=obj, raw=obj)


_MARK = "knowcat-mark-bad-bytes"
_MARK_BASE = 0xF0000  # a private-use plane: bad byte b -> chr(_MARK_BASE + b)
_UNMARK = {_MARK_BASE + b: 0xDC00 + b for b in range(256)}


def _mark_bad_bytes(e: UnicodeDecodeError):
    return "".join(chr(_MARK_BASE + b) for b in e.object[e.start:e.end]), e.end


codecs.register_error(_MARK, _mark_bad_bytes)


def _unmark(v):
    """Turn marked bad bytes back into surrogateescape characters."""
    return v.translate(_UNMARK) if isinstance(v, str) and not v.isascii() else v


def iter_csv(path: Path, max_line_bytes: int = MAX_LINE_BYTES, *, skip_bad_rows: bool = False) -> Iterator[RawRecord]:
    """CSV through pandas, every cell as text (``""`` for an empty cell: nothing is guessed)."""
    import pandas as pd

    bad_rows: list[list[str]] = []
    opts: dict = dict(dtype=str, keep_default_na=False, encoding="utf-8")
    if skip_bad_rows:
        opts.update(engine="python", index_col=False, on_bad_lines=lambda row: bad_rows.append(row) and None)
    marked = False
    try:
        try:
            df = pd.read_csv(path, **opts)
        except UnicodeDecodeError:  # pandas cannot carry surrogates: mark bad bytes, restore them after
            text = Path(path).read_bytes().decode("utf-8", _MARK)
            df = pd.read_csv(io.StringIO(text), **opts)
            marked = True
    except pd.errors.EmptyDataError:
        yield RawRecord(None, error=DataError("empty CSV file (no header)", file=path))
        return
    except (pd.errors.ParserError, ValueError) as e:
        yield RawRecord(None, error=DataError(f"malformed CSV: {e}".strip(), file=path))
        return
    for row in bad_rows:
        yield RawRecord(None, raw=row, error=DataError(
            f"malformed CSV row ({len(row)} fields, header has {len(df.columns)})", file=path))
    for n, rec in enumerate(df.to_dict(orient="records")):
        if marked:
            rec = {_unmark(k): _unmark(v) for k, v in rec.items()}
        size = sum(len(v) for v in rec.values() if isinstance(v, str))
        if size > max_line_bytes:
            yield RawRecord(n, raw=rec, error=DataError(
                f"row is {size} characters, over max_line_bytes={max_line_bytes}", file=path, record=n))
            continue
        yield RawRecord(n, value=rec, raw=rec)


def iter_parquet(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """Parquet through pyarrow; lists stay lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        yield RawRecord(None, error=DataError(f"unreadable Parquet file: {e}", file=path))
        return
    for n, rec in enumerate(rows):
        yield RawRecord(n, value=rec, raw=rec)


READERS = {"jsonl": iter_jsonl, "json": iter_json, "csv": iter_csv, "parquet": iter_parquet}
