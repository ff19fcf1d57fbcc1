"""JSON-list files are read as a stream: the records equal ``json.load``'s whatever the chunk size, the errors
of a malformed list are the ones the whole-file reader gave, and the first record comes before the file is read."""

from __future__ import annotations

import json
import random

import pytest

from knowcat.errors import DataError
from knowcat.loaders import load_records
from knowcat.loaders import readers
from knowcat.loaders.readers import _decode, _JsonText, iter_json

CHUNKS = [1, 7, 1 << 20]


@pytest.fixture(params=CHUNKS, ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch):
    monkeypatch.setattr(readers, "JSON_CHUNK", request.param)
    return request.param


def read(path, **kw):
    return [(rr.record, rr.error.reason if rr.error else None, rr.value if rr.error is None else None)
            for rr in iter_json(path, **kw)]


NESTED = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est né Ada ? 中文 😀"},
                  {"role": "assistant", "content": "London"}], "meta": {"tags": ["a", ["b", {"c": [None, True]}]]}},
    {"conversations": [{"from": "human", "value": "a ] b [ c } d { e , f : g"},
                       {"from": "gpt", "value": 'she said "yes, [no]" \\ then \\"left\\"'}]},
    {"instruction": "Sum", "input": "1, 2", "output": "3", "n": [0, -0.5, 1.5e300, -12, 123456789012345678901234567890]},
    {"question": "q?", "answers": ["x" * 5000], "empty": {}, "list": [], "s": "", "u": "\u2028\u0001\U0001f600"},
    12.5, -7, 0, 3e-5, "a string record", None, True, [1, [2, [3]]],
]


@pytest.mark.parametrize("dump", [
    lambda r: json.dumps(r),
    lambda r: json.dumps(r, ensure_ascii=False),
    lambda r: json.dumps(r, indent=2),
    lambda r: json.dumps(r, indent="\t", ensure_ascii=False, separators=(",", ":")),
    lambda r: "\r\n".join(json.dumps(r, indent=1).split("\n")),
    lambda r: " \n\t[ " + " ,\n ".join(json.dumps(x, ensure_ascii=False) for x in r) + " ]\n\n",
], ids=["plain", "unicode", "indent", "tabs-compact", "crlf", "spaced"])
def test_streamed_records_equal_json_load(tmp_path, chunk, dump):
    path = tmp_path / "d.json"
    path.write_text(dump(NESTED), encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert expected == NESTED
    assert read(path) == [(n, None, r) for n, r in enumerate(expected)]


@pytest.mark.parametrize("text", ["[]", " [ \n ] \n", "[12.5]", "[-1e5, 2E+3, 0.25]", '["]", "[", ","]'])
def test_small_lists(tmp_path, chunk, text):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    assert [v for _, _, v in read(path)] == json.loads(text)


def test_bom_and_bad_bytes_as_the_whole_file_decoder(tmp_path, chunk):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf[{"a": "caf\xe9"}, {"b": "\xff\xfe \xe4\xb8\xad"}, {"c": "\xe4\xb8"}]')
    assert read(path) == [(0, None, {"a": "caf\udce9"}), (1, None, {"b": "\udcff\udcfe \u4e2d"}),
                          (2, None, {"c": "\udce4\udcb8"})]


def test_chunked_text_is_the_decoded_file(tmp_path):
    """Any bytes (a BOM, bad or cut UTF-8) read in chunks of any size give :func:`_decode`'s text."""
    rng = random.Random(0)
    pieces = [b"\xef\xbb\xbf", b"a", b"\n", b"\xe4\xb8\xad", b"\xe4\xb8", b"\xf0\x9f\x98\x80", b"\xf0\x9f", b"\xff",
              b"\xc3\xa9", b"\xc3", b"\xed\xa0\x80", b"[", b'"']
    for trial in range(300):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        path = tmp_path / "d.bin"
        path.write_bytes(data)
        for size in (1, 2, 3, 5):
            with open(path, "rb") as f:
                t = _JsonText(f)
                while t.read(size):
                    pass
            assert t.buf == _decode(data)[0], (data, size)


# The whole-file reader's results on malformed lists (record, reason), kept: the streamed reader gives the same.
MALFORMED = {
    "missing comma": (b'[{"a": 1}, {"b": 2} {"c": 3}]', [
        (0, None, {"a": 1}), (1, None, {"b": 2}),
        (2, "malformed JSON at line 1, column 21: expected ',' or ']' after the record; records from 2 on are unreadable",
         None)]),
    "double comma": (b'[\n {"question": "a?", "answers": ["x"]},\n {"question": "b?", "answers": ["y"],,}\n]', [
        (0, None, {"question": "a?", "answers": ["x"]}),
        (1, "malformed JSON at line 3, column 38: Expecting property name enclosed in double quotes; records from 1 on "
            "are unreadable", None)]),
    "trailing comma": (b'[{"a": 1},\n {"b": 2},\n]', [
        (0, None, {"a": 1}), (1, None, {"b": 2}),
        (2, "malformed JSON at line 3, column 1: Expecting value; records from 2 on are unreadable", None)]),
    "cut in a string": (b'[{"a": 1}, {"b": "unterminated', [
        (0, None, {"a": 1}),
        (1, "malformed JSON at line 1, column 18: Unterminated string starting at; records from 1 on are unreadable",
         None)]),
    "cut after a record": (b'[{"a": 1}, {"b": 2}', [
        (0, None, {"a": 1}), (1, None, {"b": 2}),
        (2, "malformed JSON at line 1, column 20: expected ',' or ']' after the record; records from 2 on are unreadable",
         None)]),
    "extra data": (b'[{"a": 1}, {"b": 2}]\n  {"c": 3}', [
        (0, None, {"a": 1}), (1, None, {"b": 2}),
        (None, "malformed JSON at line 2, column 3: extra data after the list", None)]),
    "control character": (b'[{"a": "x"},\n\n   {"a": "tab\there"}]', [
        (0, None, {"a": "x"}),
        (1, "malformed JSON at line 3, column 14: Invalid control character at; records from 1 on are unreadable",
         None)]),
    "bad literal": (b'[{"a": 1}, {"a": tru}]', [
        (0, None, {"a": 1}),
        (1, "malformed JSON at line 1, column 18: Expecting value; records from 1 on are unreadable", None)]),
    "bad bytes": (b'[{"a": "caf\xe9"}\n, {"b": "\xff"} x]', [
        (0, None, {"a": "caf\udce9"}), (1, None, {"b": "\udcff"}),
        (2, "malformed JSON at line 2, column 14: expected ',' or ']' after the record; records from 2 on are unreadable",
         None)]),
    "BOM": (b'\xef\xbb\xbf[{"a": 1}, {"b" 2}]', [
        (0, None, {"a": 1}),
        (1, "malformed JSON at line 1, column 17: Expecting ':' delimiter; records from 1 on are unreadable", None)]),
    "CRLF": (b'[{"a": 1},\r\n{"b": 2},\r\n{"c" 3}]', [
        (0, None, {"a": 1}), (1, None, {"b": 2}),
        (2, "malformed JSON at line 3, column 6: Expecting ':' delimiter; records from 2 on are unreadable", None)]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_lists_as_before(tmp_path, chunk, case):
    data, expected = MALFORMED[case]
    path = tmp_path / "d.json"
    path.write_bytes(data)
    assert read(path) == expected
    # the snippet: the text around the error (here the whole file: it is short)
    err = [rr for rr in iter_json(path) if rr.error is not None]
    assert len(err) == 1 and err[0].raw == _decode(data)[0]


RECS = [{"id": i, "text": 'line %d, with [brackets] and "quotes"' % i} for i in range(40)]


def _late_errors():
    t = json.dumps(RECS, indent=2)
    k = t.index('"id": 31')
    return {
        "multiline": (t[:k] + '"id" 31' + t[k + len('"id": 31'):], 31, 31, '"id" 31', 5,
                      "malformed JSON at line 127, column 10: Expecting ':' delimiter; records from 31 on are unreadable"),
        "extra": (json.dumps(RECS, indent=1) + "\n\n   ]", None, 40, "]", 0,
                  "malformed JSON at line 164, column 4: extra data after the list"),
        "one line": (json.dumps(RECS[:30])[:-1] + " " + json.dumps(RECS[30]) + "]", 30, 30, ' {"id": 30', 1,
                     "malformed JSON at line 1, column 1871: expected ',' or ']' after the record; records from 30 on "
                     "are unreadable"),
    }


@pytest.mark.parametrize("case", ["multiline", "extra", "one line"])
def test_error_far_into_the_file_names_its_line_column_and_snippet(tmp_path, chunk, case):
    """Line, column and the 200 characters either side, counted over text already let go of."""
    text, record, n_good, marker, offset, reason = _late_errors()[case]
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    out = list(iter_json(path))
    assert [rr.value for rr in out[:-1]] == RECS[:n_good]
    err = out[-1]
    assert (err.record, err.error.reason) == (record, reason)
    pos = text.rindex(marker) + offset  # where the error is
    assert pos > readers.SNIPPET
    assert err.raw == text[pos - readers.SNIPPET: pos + readers.SNIPPET]


def test_malformed_list_through_the_loader_names_record_and_line(tmp_path, chunk):
    path = tmp_path / "d.json"
    path.write_bytes(MALFORMED["double comma"][0])
    with pytest.raises(DataError) as ei:
        load_records(path)
    assert ei.value.record == 1 and "line 3" in str(ei.value) and str(path) in str(ei.value)


def test_nan_and_infinity_are_bad_records_the_list_goes_on(tmp_path, chunk):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, {"a": [NaN]}, {"a": 3}, {"b": -Infinity, "c": "x"}]', encoding="utf-8")
    assert read(path) == [
        (0, None, {"a": 1}), (1, "NaN is not valid JSON (JSON has no NaN or Infinity; write null)", None),
        (2, None, {"a": 3}), (3, "-Infinity is not valid JSON (JSON has no NaN or Infinity; write null)", None)]
    assert [rr.raw for rr in iter_json(path) if rr.error] == ['{"a": [NaN]}', '{"b": -Infinity, "c": "x"}']


@pytest.mark.parametrize("size", [7, 1 << 20])  # (a 200,000-character record read a byte at a time proves nothing more)
def test_deep_nesting_is_an_error_not_a_crash(tmp_path, monkeypatch, size):
    monkeypatch.setattr(readers, "JSON_CHUNK", size)
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1}, ' + "[" * 100000 + "]" * 100000 + ', {"b": 2}]', encoding="utf-8")
    assert read(path) == [(0, None, {"a": 1}), (1, "malformed JSON at line 1, column 12: the record nests too deeply "
                                                  "to read; records from 1 on are unreadable", None)]


def test_record_over_max_line_bytes(tmp_path, chunk):
    recs = [{"q": "a"}, {"q": "b" * 100}, {"q": "c"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    size = len(json.dumps(recs[1]))  # the record's text in the file
    assert read(path, max_line_bytes=size) == [(n, None, r) for n, r in enumerate(recs)]
    assert read(path, max_line_bytes=size - 1) == [
        (0, None, recs[0]), (1, f"record is {size} characters, over max_line_bytes={size - 1}", None),
        (2, None, recs[2])]


@pytest.mark.parametrize("data, found", [
    (b"", "an empty file"), (b" \n\t ", "an empty file"), (b"\xef\xbb\xbf", "an empty file"),
    (b' "hello"', "'\"hello\"'..."), (b"42", "'42'..."),
    (b'"a string longer than twenty characters"', "'\"a string longer tha'..."),
])
def test_not_a_list(tmp_path, chunk, data, found):
    path = tmp_path / "d.json"
    path.write_bytes(data)
    assert read(path) == [(None, f"expected a JSON list of records, found {found}", None)]


def test_json_lines_named_json(tmp_path, chunk):
    path = tmp_path / "d.json"
    path.write_bytes(b'\xef\xbb\xbf \n{"a": 1}\n\n{"a": [2]}\n')
    assert read(path) == [(2, None, {"a": 1}), (4, None, {"a": [2]})]


def test_first_record_comes_before_the_file_is_read(tmp_path, monkeypatch):
    """Streaming: the first record is yielded after a few chunks, not the whole file; the rest after."""
    recs = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "x" * i}]}
            for i in range(500)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs, indent=1), encoding="utf-8")
    size = path.stat().st_size
    read_bytes = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read_bytes.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(readers, "JSON_CHUNK", 64)
    monkeypatch.setattr(readers, "open", lambda p, mode="r", *a, **kw: Counting(open(p, mode, *a, **kw)), raising=False)
    it = iter_json(path)
    first = next(it)
    assert first.value == recs[0]
    assert 0 < sum(read_bytes) <= 1024 < size // 100  # the first record and a few chunks
    assert [rr.value for rr in it] == recs[1:]
    assert sum(read_bytes) == size
