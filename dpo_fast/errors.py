"""User mistakes as one exception type, so the command line can tell them from internal errors.

`UserError` is raised for anything the user can fix (a missing file, a bad option, data without usable
rows, an unsupported model). The CLI prints it as one line, ``dpo-fast: error: <message>``, and exits with
status 2; any other exception is an internal error and keeps its traceback. It subclasses ValueError, so
code that catches ValueError from the Python API keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says what is wrong, where (file, line, flag) and what to do."""
