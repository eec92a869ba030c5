"""The one exception type users see: a message that says where, what and how to fix."""

from __future__ import annotations


class SftError(Exception):
    """A problem with the user's input or environment.

    The CLI prints ``str(error)`` (no traceback) and exits with status 1.
    Messages follow ``WHERE: what is wrong; how to fix``.
    """


class NonFiniteLoss(SftError):
    """A training step whose loss or gradient norm was NaN or infinite (``train.on_nan: stop``).

    ``step`` is the 1-based optimizer step, ``what`` names the quantity (``loss`` or
    ``grad_norm``) and ``value`` is what it was; ``sft sweep`` records such a trial as pruned
    ("diverged") from these fields, never from the message text.
    """

    def __init__(self, message: str, step: int, what: str, value: float) -> None:
        super().__init__(message)
        self.step, self.what, self.value = step, what, value

    @property
    def reason(self) -> str:
        """``diverged: loss is nan at step 3`` / ``diverged: grad_norm is inf at step 2``."""
        return f"diverged: {self.what} is {self.value} at step {self.step}"
