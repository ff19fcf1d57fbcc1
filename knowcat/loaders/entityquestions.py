"""EntityQuestions (Sciavolino et al. 2021) in its original layout.

``{train,dev,test}/P<id>.<split>.json`` (each a JSON list of
``{"question", "answers"}``) and ``relation_query_templates.json`` (relation ->
template with ``[X]`` for the subject). The subject of each question is
recovered by matching the question against its relation's template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from knowcat.errors import DataError
from knowcat.examples import QAExample
from knowcat.loaders.collect import ExampleCollector
from knowcat.loaders.fields import FieldMap
from knowcat.loaders.readers import iter_json
from knowcat.loaders.rejects import RejectWriter

IN_DISTRIBUTION_RELATIONS = ("P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69", "P740", "P800")
OOD_RELATIONS = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")
SPLITS = ("train", "dev", "test")
TEMPLATES_FILE = "relation_query_templates.json"
_FILE = re.compile(r"^(?P<rel>[^.]+)\.(?P<split>[^.]+)\.json$")


def is_entityquestions_folder(path) -> bool:
    return (Path(path) / TEMPLATES_FILE).is_file()


def _fixed(part: str) -> str:
    """A template's fixed text as a regex: escaped, any run of white space matching any other."""
    return r"\s+".join(re.escape(w) for w in part.split())


def template_regex(template: str) -> re.Pattern:
    """A regex for one template: everything but ``[X]`` literal (tolerant of white space,
    case and a missing or extra final question mark); the subject is group ``subject``."""
    if template.count("[X]") != 1:
        raise ValueError(f"template must hold [X] exactly once: {template!r}")
    pre, raw_post = template.split("[X]")
    post = raw_post.strip().rstrip("?").rstrip()
    sep_pre = r"\s+" if pre[-1:].isspace() else r"\s*"
    sep_post = r"\s+" if raw_post[:1].isspace() else r"\s*"
    pattern = (r"^\s*" + (_fixed(pre) + sep_pre if pre.strip() else "") + r"(?P<subject>.+?)"
               + (sep_post + _fixed(post) if post else "") + r"\s*\??\s*$")
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


def match_subject(pattern: re.Pattern, question: str) -> str | None:
    m = pattern.match(question)
    return m.group("subject").strip() if m else None


def load_templates(folder) -> dict[str, str]:
    path = Path(folder) / TEMPLATES_FILE
    if not path.is_file():
        raise DataError(f"not an EntityQuestions folder: {TEMPLATES_FILE} is missing", file=folder)
    try:
        templates = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed templates file: {e}", file=path) from None
    if not isinstance(templates, dict):
        raise DataError("expected a JSON object relation -> template", file=path)
    for rel, t in templates.items():
        if not isinstance(t, str) or t.count("[X]") != 1:
            raise DataError(f"template must be a string holding [X] exactly once, got {t!r}", file=path, field=rel)
    return templates


def _rel_key(rel: str):
    digits = rel[1:]
    return (0, int(digits), rel) if rel[:1] == "P" and digits.isdigit() else (1, 0, rel)


def discover_relations(folder, splits: Iterable[str] = SPLITS) -> list[str]:
    """Relations with a file in any of ``splits``, in numeric order (P17 before P112)."""
    rels = set()
    for split in splits:
        for p in (Path(folder) / split).glob(f"*.{split}.json"):
            m = _FILE.match(p.name)
            if m and m["split"] == split:
                rels.add(m["rel"])
    return sorted(rels, key=_rel_key)


def load_entityquestions(
    folder,
    splits: Sequence[str] = SPLITS,
    relations: Sequence[str] | None = None,
    on_error: str = "raise",
    rejects: "str | Path | RejectWriter | None" = None,
) -> list[QAExample]:
    """Load an EntityQuestions folder as examples (split-major, then relation in numeric order).

    ``relations`` None means every relation found. Each example gets
    ``relation`` from its file name, ``split`` from its folder, ``subject``
    from the template (None when the question does not match), and a content
    id (exact duplicates, such as P495 train's, get ``-2``, ``-3`` ...).
    A requested relation or split with no file raises :class:`DataError`.
    """
    folder = Path(folder)
    if isinstance(splits, str):
        splits = (splits,)
    templates = load_templates(folder)
    rels = list(relations) if relations is not None else discover_relations(folder, splits)
    if not rels:
        raise DataError(f"no P<id>.<split>.json files for splits {list(splits)}", file=folder)
    patterns = {}
    for rel in rels:
        if rel not in templates:
            raise DataError("no template for this relation", file=folder / TEMPLATES_FILE, field=rel)
        patterns[rel] = template_regex(templates[rel])
    fm = FieldMap(id=None, relation=None, subject=None, split=None)
    collector = ExampleCollector(on_error, rejects, source=folder)
    for split in splits:
        if not (folder / split).is_dir():
            raise DataError(f"missing split folder {split!r}", file=folder / split)
        for rel in rels:
            path = folder / split / f"{rel}.{split}.json"
            if not path.is_file():
                if relations is None:
                    continue  # a relation missing from one split only
                raise DataError("missing file", file=path)
            for rr in iter_json(path):
                if rr.error is not None:
                    collector.reject(rr.error, rr.raw)
                    continue
                ex = collector.add(rr.value, fm, file=path, record=rr.record, relation=rel, split=split)
                if ex is not None:
                    ex.subject = match_subject(patterns[rel], ex.question)
    return collector.finish()


def subject_share(examples: Sequence[QAExample]) -> float:
    """The share of examples whose subject is known."""
    return sum(ex.subject is not None for ex in examples) / len(examples) if examples else 0.0
