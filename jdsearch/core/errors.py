"""Project exceptions: every error a user can cause is one of these, with a one-line message.

The message names the file, field or record at fault and the offending value, so that a user can
fix the input without reading a traceback. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence


class JDSearchError(Exception):
    """Base class for errors caused by user input (specs, data, checkpoints, storage)."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        # One line, always: a multi-line message hides the part that names the culprit. Several
        # culprits (``details``) are one line each, printed under it.
        super().__init__(" ".join(str(message).split()))
        self.details = tuple(" ".join(str(d).split()) for d in details)


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of ``e``'s message (its type's name when it has none), at most ``limit``
    characters: what a one-line error quotes of another error."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if limit is None else text[:limit]


class SpecError(JDSearchError):
    """A detector/study spec or an architecture encoding is malformed or inconsistent."""


class DataError(JDSearchError):
    """A dataset (annotation file, image folder) is malformed."""


class CheckpointError(JDSearchError):
    """A checkpoint is missing, corrupt, tampered with, or does not match its architecture."""


class ExportError(JDSearchError):
    """An export folder cannot be written or read, or its ONNX graph disagrees with PyTorch."""


class RanksOutOfStep(RuntimeError):
    """A rank failed alone inside a section every rank runs together (a training, loading a
    trial's pair): the others wait in a collective that will never complete. Not a
    :class:`~jdsearch.core.errors.JDSearchError`, so that no loop carries on: the process exits, and
    ``torchrun`` stops the other ranks; the trial is retried like a killed worker's."""
