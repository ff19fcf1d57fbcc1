"""Errors that name the file, the record and the field."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: names the file, the record (index or id) and the field."""

    def __init__(self, reason: str, *, file=None, record=None, field=None):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.record = record
        self.field = field
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def as_reject(self) -> dict:
        return {"file": self.file, "record": self.record, "field": self.field, "reason": self.reason}


class UsageError(ValueError):
    """A mistake in how knowcat was called (an argument, a path, a model folder): the message says what
    is wrong and what to do instead. The command line prints it as one line and exits with code 2."""
