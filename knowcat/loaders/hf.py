"""Hugging Face ``datasets`` on local disk: ``save_to_disk`` folders and local data files.

Nothing here touches the network: the path must exist locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.loaders.collect import ExampleCollector, log
from knowcat.loaders.fields import FieldMap
from knowcat.loaders.readers import MAX_LINE_BYTES
from knowcat.loaders.rejects import RejectWriter
from knowcat.loaders.tabular import collect_file, detect_format

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BUILDERS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet",
            ".pq": "parquet", ".arrow": "arrow", ".txt": "text"}


def is_saved_dataset(path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS)


def _read(path: Path, cache_dir, load_kwargs: dict):
    """``load_from_disk`` for a saved folder, else ``load_dataset`` on the local folder or file."""
    import datasets

    if is_saved_dataset(path):
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"no datasets builder for suffix {path.suffix!r}", file=path)
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **load_kwargs)
    return datasets.load_dataset(str(path), cache_dir=cache_dir, **load_kwargs)


def _data_files(path: Path) -> dict[str | None, list[Path]]:
    """The data files ``load_dataset`` would read, by split (None for a single file)."""
    if path.is_file():
        return {None: [path]}
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
    except Exception as e:  # datasets' EmptyDatasetError and kin
        raise DataError(f"no data files datasets can read in this folder ({type(e).__name__})", file=path) from None
    found = DataFilesDict.from_patterns(patterns, base_path=str(path))
    return {str(name): [Path(f) for f in files] for name, files in found.items()}


def _parts(obj, split, path: Path) -> list[tuple[str | None, Any]]:
    """(split name, Dataset) pairs; ``split`` selects splits of a DatasetDict."""
    if not isinstance(obj, Mapping):
        return [(None, obj)]
    names = list(obj)
    wanted = names if split is None else ([split] if isinstance(split, str) else list(split))
    missing = [s for s in wanted if s not in obj]
    if missing:
        raise DataError(f"no split(s) {missing}; the dataset has {names}", file=path)
    return [(name, obj[name]) for name in wanted]


def load_hf_dataset(
    path,
    split: str | Sequence[str] | None = None,
    fields: FieldMap | Mapping[str, str | None] | None = None,
    relation: str | None = None,
    answers_sep: str | None = None,
    on_error: str = "raise",
    rejects: "str | Path | RejectWriter | None" = None,
    cache_dir=None,
    max_line_bytes: int = MAX_LINE_BYTES,
    **load_kwargs,
) -> list[QAExample]:
    """Load examples from a local Hugging Face dataset.

    ``path``: a folder saved with ``save_to_disk`` (read with
    ``datasets.load_from_disk``), or a local folder / data file that
    ``datasets.load_dataset`` can read. With a DatasetDict, ``split`` selects
    splits (default all) and each split's name becomes the example's ``split``
    unless the record has one; with a single Dataset, ``split`` is the label
    for records without one. When ``load_dataset`` cannot read raw JSON / CSV /
    Parquet files (mixed types, bad lines), they are read by knowcat's own
    readers, so errors name the file, record and field (and skip mode works).
    Rows are numbered ``<split>[i]`` in errors.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such local file or folder (knowcat never downloads datasets)", file=path)
    if path.is_dir() and not any(path.iterdir()):
        raise DataError("empty folder: no data files in it", file=path)
    fm = FieldMap.coerce(fields)
    collector = ExampleCollector(on_error, rejects, source=path)
    try:
        obj = _read(path, cache_dir, load_kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; fall back to our readers for raw files
        if is_saved_dataset(path):
            raise DataError(f"datasets.load_from_disk failed: {type(e).__name__}: {e}", file=path) from e
        _fallback(collector, path, e, split, fm, relation, answers_sep, max_line_bytes)
        return collector.finish()
    for name, ds in _parts(obj, split if isinstance(obj, Mapping) else None, path):
        label = name if name is not None else (split if isinstance(split, str) else None)
        for i, row in enumerate(ds.to_list()):
            collector.add(row, fm, file=path, record=f"{name}[{i}]" if name else i, relation=relation,
                          split=label, answers_sep=answers_sep)
    return collector.finish()


def _fallback(collector, path, error, split, fm, relation, answers_sep, max_line_bytes) -> None:
    files = _data_files(path)
    readable = {s: [f for f in fs if detect_format(f)] for s, fs in files.items()}
    if not any(readable.values()):
        raise DataError(f"datasets.load_dataset failed: {type(error).__name__}: {error}", file=path) from error
    log.info("datasets could not read %s (%s); reading its files directly", path, type(error).__name__)
    wanted = None if split is None or None in readable else ({split} if isinstance(split, str) else set(split))
    for name, fs in readable.items():
        if wanted is not None and name not in wanted:
            continue
        label = name if name is not None else (split if isinstance(split, str) else None)
        for f in fs:
            collect_file(collector, f, detect_format(f), fm, relation=relation, split=label,
                         answers_sep=answers_sep, max_line_bytes=max_line_bytes)
