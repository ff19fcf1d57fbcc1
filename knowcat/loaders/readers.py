"""Raw record readers: files -> ``RawRecord`` (a parsed record, or the error that stopped it).

Record numbers: the 1-based line number for JSONL, the 0-based position for
JSON lists, CSV data rows and Parquet rows. Undecodable bytes are read with
``surrogateescape`` so the validator can name the field that holds them.
"""

from __future__ import annotations

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
                value = loads(text)
            except RecursionError:
                yield RawRecord(lineno, raw=line[:4096], error=DataError(
                    f"line {lineno} nests too deeply to read", file=path, record=lineno))
                continue
            except ValueError as e:
                if not isinstance(e, json.JSONDecodeError):
                    yield RawRecord(lineno, raw=line, error=DataError(str(e), file=path, record=lineno))
                    continue
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
            except RecursionError:
                yield _array_error(text, path, n, i, "the record nests too deeply to read")
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
        records = loads(text)
    except json.JSONDecodeError:
        yield from _scan_array(text, path)
        return
    except ValueError as e:  # NaN / Infinity
        yield RawRecord(None, error=DataError(str(e), file=path))
        return
    except RecursionError:
        yield RawRecord(None, error=DataError("the JSON nests too deeply to read", file=path))
        return
    for n, obj in enumerate(records):
        size = len(json.dumps(obj, ensure_ascii=False))
        if size > max_line_bytes:
            yield RawRecord(n, raw=None, error=DataError(
                f"record is {size} characters, over max_line_bytes={max_line_bytes}", file=path, record=n))
            continue
        yield RawRecord(n, value=obj, raw=obj)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (JSON has no NaN or Infinity; write null)")


def loads(text: str):
    """``json.loads`` that refuses NaN and Infinity (Python's json accepts them; no JSON reader
    elsewhere does, and knowcat never writes them)."""
    return json.loads(text, parse_constant=_no_constant)


def iter_csv(path: Path, max_line_bytes: int = MAX_LINE_BYTES, *, skip_bad_rows: bool = False) -> Iterator[RawRecord]:
    """CSV with Python's ``csv`` module, every cell as text (``""`` for an empty cell: nothing is guessed).

    A row with fewer or more cells than the header is a bad record (naming the first missing
    column), never padded with empty or NaN cells. ``skip_bad_rows`` is accepted for
    compatibility: bad rows are always yielded as errors, and the collector's policy decides.
    """
    import csv

    text, _ = _decode(Path(path).read_bytes())  # BOM dropped; bad bytes kept as surrogates for the validator
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        yield RawRecord(None, error=DataError(f"malformed CSV header: {e}", file=path))
        return
    if header is None or not any(h.strip() for h in header):
        yield RawRecord(None, error=DataError("empty CSV file (no header)", file=path))
        return
    dup = next((h for h in header if header.count(h) > 1), None)
    if dup is not None:
        yield RawRecord(None, error=DataError(f"the header names column {dup!r} twice", file=path, field=dup))
        return
    n = -1
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            n += 1
            yield RawRecord(n, error=DataError(f"malformed CSV row at line {start}: {e}", file=path, record=n))
            return  # the parser cannot resynchronize after a broken quote
        if not row or row == [""]:
            continue  # a blank line
        n += 1
        size = sum(len(c) for c in row)
        if size > max_line_bytes:
            yield RawRecord(n, raw=row, error=DataError(
                f"row is {size} characters, over max_line_bytes={max_line_bytes}", file=path, record=n))
            continue
        if len(row) != len(header):
            missing = header[len(row)] if len(row) < len(header) else None
            what = f"missing column {missing!r}" if missing is not None else "extra cells beyond the header"
            yield RawRecord(n, raw=row, error=DataError(
                f"malformed CSV row at line {start}: {len(row)} cells, the header has {len(header)} ({what})",
                file=path, record=n, field=missing))
            continue
        rec = dict(zip(header, row))
        yield RawRecord(n, value=rec, raw=rec)


JSON_COLUMNS_KEY = b"knowcat.json_columns"


def parquet_rows(path: Path) -> list[dict]:
    """Rows of a Parquet file; columns that knowcat stored as JSON text (mixed types, nested
    mappings: see :func:`knowcat.filtering.write_records`) are decoded back."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    rows = table.to_pylist()
    cols = json.loads(meta[JSON_COLUMNS_KEY]) if JSON_COLUMNS_KEY in meta else []
    for col in cols:
        for r in rows:
            if r.get(col) is not None:
                r[col] = json.loads(r[col])
    return rows


def iter_parquet(path: Path, max_line_bytes: int = MAX_LINE_BYTES, batch_size: int = 1024) -> Iterator[RawRecord]:
    """Parquet through pyarrow, ``batch_size`` rows in memory at a time; lists stay lists, columns
    stored as JSON text (see :func:`parquet_rows`) are decoded back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        cols = json.loads(meta[JSON_COLUMNS_KEY]) if JSON_COLUMNS_KEY in meta else []
        for batch in pf.iter_batches(batch_size=batch_size):
            rows = batch.to_pylist()
            for col in cols:
                for r in rows:
                    if r.get(col) is not None:
                        r[col] = json.loads(r[col])
            for rec in rows:
                yield RawRecord(n, value=rec, raw=rec)
                n += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        yield RawRecord(None, error=DataError(f"unreadable Parquet file: {e}", file=path))


READERS = {"jsonl": iter_jsonl, "json": iter_json, "csv": iter_csv, "parquet": iter_parquet}
