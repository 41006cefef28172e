"""Moved: the audit lives in :mod:`medvit_explain.workflows.audit`; its ``audit.html``, ``audit.csv`` and
``audit.json`` are written by :mod:`medvit_explain.report.evaluation`. This module keeps the old import path."""

from .report.evaluation import write_audit
from .workflows.audit import AuditResult, StudyPicture, audit, calibration, curves

__all__ = ["AuditResult", "StudyPicture", "audit", "calibration", "curves", "write_audit"]
