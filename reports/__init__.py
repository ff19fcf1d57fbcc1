"""The HTML report of a run, built only from the run directory's files."""

from reports.build import build_report

__all__ = ["build_report"]
