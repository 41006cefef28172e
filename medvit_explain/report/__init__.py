"""The HTML report of an explained volume (``write_report``) and its matplotlib figures."""

from .html import render_report, top_entries, write_report

__all__ = ["render_report", "top_entries", "write_report"]
