"""The error policy shared by every loader: raise, or skip and record the reject."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from knowcat.errors import DataError
from knowcat.examples import QAExample, assign_content_ids
from knowcat.loaders.fields import FieldMap, to_example
from knowcat.loaders.rejects import RejectWriter

log = logging.getLogger("knowcat.loaders")

ON_ERROR = ("raise", "skip")


class ExampleCollector:
    """Builds the example list of one loader call.

    ``on_error="raise"`` raises the first :class:`DataError`; ``"skip"`` drops the
    bad record, adds it to ``rejects`` (a path or a shared :class:`RejectWriter`)
    and counts it. Ids given by the data must be unique; examples without one get
    content ids at :meth:`finish`.
    """

    def __init__(self, on_error: str = "raise", rejects: "str | Path | RejectWriter | None" = None,
                 source: Any = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.on_error = on_error
        self.source = source
        self._own_writer = rejects is not None and not isinstance(rejects, RejectWriter)
        self.writer = RejectWriter(rejects) if self._own_writer else rejects
        self.examples: list[QAExample] = []
        self.skipped = 0
        self._ids: dict[str, Any] = {}

    def reject(self, error: DataError, raw: Any = None) -> None:
        """Raise ``error`` or record it, according to ``on_error``."""
        if self.on_error == "raise":
            raise error
        self.skipped += 1
        if self.writer is not None:
            self.writer.add(error, raw)

    def add(self, raw: Any, fm: FieldMap, *, file=None, record=None, **kw) -> QAExample | None:
        """Validate ``raw`` and keep its example; returns it, or None when rejected."""
        try:
            ex = to_example(raw, fm, file=file, record=record, **kw)
            if ex.id:
                if ex.id in self._ids:
                    raise DataError(f"duplicate id {ex.id!r} (first seen at record {self._ids[ex.id]})",
                                    file=file, record=record, field=fm.id)
                self._ids[ex.id] = record
        except DataError as e:
            self.reject(e, raw)
            return None
        self.examples.append(ex)
        return ex

    def finish(self) -> list[QAExample]:
        """Assign content ids, write the rejects file, report what was skipped."""
        out = list(assign_content_ids(self.examples))
        if self._own_writer:
            self.writer.close()
        if self.skipped:
            where = f"; rejects in {self.writer.path}" if self.writer is not None else ""
            log.warning("skipped %d bad record(s) from %s%s", self.skipped, self.source, where)
        return out
