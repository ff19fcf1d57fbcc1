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


JSON_CHUNK = 1 << 20  # bytes read at a time from a JSON list
_LOOKAHEAD = 16  # characters past an element's end (or a parse error) before it is taken as final


class _JsonText:
    """The text of a UTF-8 file read a chunk at a time (BOM dropped, bad bytes kept as surrogates, as
    :func:`_decode` does), holding only the part from the cursor ``i`` on; positions in error messages
    are the whole file's line and column."""

    def __init__(self, f):
        self.f = f
        self.dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.i = 0
        self.eof = False
        self.started = False
        self.lines = 0  # newlines before buf
        self.col = 0  # characters between the last newline before buf and buf
        self.tail = ""  # the last SNIPPET characters before buf

    def read(self, size: int | None = None) -> bool:
        """Drop the text before the cursor and append the next chunk; False once the file is read."""
        if self.eof:
            return False
        cut, buf = self.i, self.buf
        if cut:
            self.lines += buf.count("\n", 0, cut)
            k = buf.rfind("\n", 0, cut)
            self.col = cut - k - 1 if k >= 0 else self.col + cut
            self.tail = (self.tail + buf[max(0, cut - SNIPPET):cut])[-SNIPPET:]
        data = self.f.read(size or JSON_CHUNK)
        self.eof = not data
        text = self.dec.decode(data, final=self.eof)
        if text and not self.started:
            self.started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        self.buf = buf[cut:] + text if cut else buf + text
        self.i = 0
        return True

    def skip_ws(self) -> None:
        """Move the cursor past white space, reading on as needed."""
        while True:
            self.i = _WS.match(self.buf, self.i).end()
            if self.i < len(self.buf) or not self.read():
                return

    def ahead(self, k: int) -> str:
        """The ``k`` characters from the cursor (fewer at the end of the file)."""
        while len(self.buf) < self.i + k and self.read():
            pass
        return self.buf[self.i:self.i + k]

    def decode(self, decoder: json.JSONDecoder):
        """The JSON value at the cursor and its text's length, the buffer grown (doubling) while it
        may be incomplete; the cursor is left at the value's start."""
        size = JSON_CHUNK
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.i)
            except json.JSONDecodeError as e:
                # an error at the buffer's end, or a string not closed yet, may be text not read yet
                if (e.pos >= len(self.buf) - _LOOKAHEAD or e.msg.startswith("Unterminated string")) and self.read(size):
                    size *= 2
                    continue
                raise
            # a number may go on past the buffer's end (``12`` of ``12.5``)
            if end > len(self.buf) - _LOOKAHEAD and self.read(size):
                size *= 2
                continue
            return obj, end - self.i

    def position(self, pos: int) -> tuple[int, int]:
        line = self.lines + self.buf.count("\n", 0, pos) + 1
        k = self.buf.rfind("\n", 0, pos)
        return line, pos - k if k >= 0 else self.col + pos + 1

    def error(self, path: Path, n, pos: int, msg: str) -> RawRecord:
        """A malformed-JSON error at ``pos`` of the buffer (the record ``n`` and those after it unread)."""
        line, col = self.position(pos)
        before = (self.tail + self.buf[max(0, pos - SNIPPET):pos])[-SNIPPET:]
        self.i = pos
        after = self.ahead(SNIPPET)
        tail = "" if n is None else f"; records from {n} on are unreadable"
        return RawRecord(n, raw=before + after, error=DataError(
            f"malformed JSON at line {line}, column {col}: {msg}{tail}", file=path, record=n))


_STRICT = json.JSONDecoder(parse_constant=lambda name: _no_constant(name))
# finds where a value that _STRICT refused ends (it converts no number, accepts NaN)
_SKIP = json.JSONDecoder(parse_int=lambda s: None, parse_float=lambda s: None, parse_constant=lambda s: None)


def iter_json(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """A JSON file holding a list of records, streamed: the file is read :data:`JSON_CHUNK` bytes at a
    time and each record yielded once parsed, so memory holds one record and a chunk, not the file (a
    ``.json`` file in JSON Lines form is read as such).

    A record with NaN or Infinity, or whose text is over ``max_line_bytes`` characters, is a bad record;
    where the list itself is malformed, the error names the line, column and record, and the records
    before it are yielded.
    """
    with open(path, "rb") as f:
        t = _JsonText(f)
        t.skip_ws()
        first = t.ahead(1)
        if first == "{":
            jsonl = True
        elif first != "[":
            what = "an empty file" if not first else f"{t.ahead(20)!r}..."
            yield RawRecord(None, error=DataError(f"expected a JSON list of records, found {what}", file=path))
            return
        else:
            jsonl = False
            yield from _json_list(t, path, max_line_bytes)
    if jsonl:
        yield from iter_jsonl(path, max_line_bytes)


def _decode_record(t: _JsonText, decoder, path: Path, n: int):
    """``((value, size), None)``, or ``((None, 0), error)`` where the list is malformed at record ``n``
    (the error ends it). A ``ValueError`` other than malformed JSON (NaN with :data:`_STRICT`) propagates."""
    try:
        return t.decode(decoder), None
    except json.JSONDecodeError as e:
        return (None, 0), t.error(path, n, e.pos, e.msg)
    except RecursionError:
        return (None, 0), t.error(path, n, t.i, "the record nests too deeply to read")


def _json_list(t: _JsonText, path: Path, max_line_bytes: int) -> Iterator[RawRecord]:
    t.i += 1  # past '['
    t.skip_ws()
    n = 0
    if t.ahead(1) == "]":
        t.i += 1
    else:
        while True:
            try:
                (obj, size), end = _decode_record(t, _STRICT, path, n)
                bad = None
            except ValueError as e:  # NaN, Infinity, an integer too long to convert: a bad record, the list goes on
                (obj, size), end = _decode_record(t, _SKIP, path, n)
                obj, bad = None, e
            if end is not None:  # the list is malformed here: the error ends it
                yield end
                return
            start = t.i
            if bad is not None:
                yield RawRecord(n, raw=t.buf[start:start + size], error=DataError(str(bad), file=path, record=n))
            elif size > max_line_bytes:
                yield RawRecord(n, raw=None, error=DataError(
                    f"record is {size} characters, over max_line_bytes={max_line_bytes}", file=path, record=n))
            else:
                yield RawRecord(n, value=obj, raw=obj)
            del obj
            n += 1
            t.i = start + size
            t.skip_ws()
            c = t.ahead(1)
            if c == ",":
                t.i += 1
                t.skip_ws()
            elif c == "]":
                t.i += 1
                break
            else:
                yield t.error(path, n, t.i, "expected ',' or ']' after the record")
                return
    t.skip_ws()
    if t.i < len(t.buf):
        yield t.error(path, None, t.i, "extra data after the list")


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
