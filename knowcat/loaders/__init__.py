"""Data loaders: EntityQuestions, JSONL / JSON / CSV / Parquet files, local HF datasets.

Every loader returns ``list[QAExample]``, validates every record the same way
(:mod:`knowcat.loaders.fields`), and either raises :class:`knowcat.errors.DataError`
naming the file, record and field, or with ``on_error="skip"`` writes the bad
records to a rejects JSONL file. :func:`load_examples` picks the loader.
"""

from __future__ import annotations

from pathlib import Path

from knowcat.errors import DataError, UsageError
from knowcat.examples import QAExample
from knowcat.loaders.entityquestions import (
    IN_DISTRIBUTION_RELATIONS,
    OOD_RELATIONS,
    is_entityquestions_folder,
    load_entityquestions,
    subject_share,
)
from knowcat.loaders.fields import FieldMap
from knowcat.loaders.filters import FilterReport, apply_paper_filters, drop_multi_answer, drop_train_test_overlap
from knowcat.loaders.hf import is_saved_dataset, load_hf_dataset
from knowcat.loaders.readers import MAX_LINE_BYTES
from knowcat.loaders.rejects import RejectWriter, read_rejects
from knowcat.loaders.tabular import FORMATS, detect_format, load_records

__all__ = [
    "FieldMap", "FilterReport", "RejectWriter", "IN_DISTRIBUTION_RELATIONS", "OOD_RELATIONS", "MAX_LINE_BYTES",
    "load_examples", "load_entityquestions", "load_records", "load_hf_dataset", "read_rejects",
    "drop_multi_answer", "drop_train_test_overlap", "apply_paper_filters", "subject_share",
]

_ALIASES = {"entityquestions": "entityquestions", "eq": "entityquestions", "hf": "hf", "datasets": "hf"}


def load_examples(source, format: str | None = None, **opts) -> list[QAExample]:
    """Load examples from ``source`` with the loader that fits it.

    ``format``: ``"entityquestions"``, ``"hf"``, or a file format (``jsonl``,
    ``json``, ``csv``, ``parquet``); without it: a folder with
    ``relation_query_templates.json`` is EntityQuestions, a folder saved by
    ``datasets`` is HF, a file goes by its suffix, anything else is tried with
    ``datasets.load_dataset``. ``opts`` go to the chosen loader.
    """
    path = Path(source)
    kind = _ALIASES.get((format or "").lower()) if format else None
    if format and kind is None:
        if format.lower() not in FORMATS:
            raise UsageError(f"unknown format {format!r}; choose entityquestions, hf or one of {', '.join(FORMATS)}")
        return load_records(path, format=format, **opts)
    if kind is None:
        if not path.exists():
            raise DataError("no such file or folder", file=path)
        if path.is_dir() and is_entityquestions_folder(path):
            kind = "entityquestions"
        elif is_saved_dataset(path):
            kind = "hf"
        elif path.is_file() and detect_format(path):
            return load_records(path, **opts)
        else:
            kind = "hf"
    if kind == "entityquestions":
        return load_entityquestions(path, **_entityquestions_opts(path, opts))
    return load_hf_dataset(path, **opts)


def _entityquestions_opts(path: Path, opts: dict) -> dict:
    """The options that apply to an EntityQuestions folder: ``split`` selects splits (comma-separated);
    field mappings, a default relation and an answers separator mean nothing there and are refused."""
    opts = dict(opts)
    flags = {"fields": "--field", "relation": "--relation", "answers_sep": "--answers-sep"}
    given = [flag for key, flag in flags.items() if opts.pop(key, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} do(es) not apply to the EntityQuestions folder {path} (its file "
                         f"names give each record's relation and split; its records hold question and answers); "
                         f"drop {' and '.join(given)}")
    split = opts.pop("split", None)
    if split is not None:
        from knowcat.loaders.entityquestions import SPLITS

        splits = tuple(s.strip() for s in split.split(",") if s.strip()) if isinstance(split, str) else tuple(split)
        bad = [s for s in splits if s not in SPLITS]
        if bad or not splits:
            raise UsageError(f"--split {split!r}: an EntityQuestions folder has the splits {', '.join(SPLITS)}; "
                             f"give one or several of them, comma-separated")
        opts["splits"] = splits
    return opts
