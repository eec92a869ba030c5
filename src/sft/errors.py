"""The one exception type users see: a message that says where, what and how to fix."""

from __future__ import annotations


class SftError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` (no traceback) and exits with status 1.
    Messages follow ``WHERE: what is wrong; how to fix``.
    """
