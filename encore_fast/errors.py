"""The errors encore_fast raises for a user's mistake or a damaged input.

Every one of them names what was asked and what is wrong, and is raised before anything is
changed (weights, sequential state, history, files). They share :class:`EncoreFastError`, so a
caller (the CLI first) can tell "the input is wrong" from a bug; each also derives from the
built-in exception that code written against earlier versions caught.
"""

from __future__ import annotations


class EncoreFastError(Exception):
    """Base class: a bad request, setting, file or state; nothing was changed."""


class ConfigError(EncoreFastError, ValueError, TypeError):
    """An unknown or out-of-range setting, method, preset or engine."""


class RequestError(EncoreFastError, ValueError):
    """A request that cannot be edited; the message names the request and the problem."""


class StatsError(EncoreFastError, ValueError):
    """Key statistics ``C0`` of the wrong shape, not symmetric, or not finite."""


class EditsFileError(EncoreFastError, ValueError):
    """An edits file that is unreadable, damaged, or made for another model or setting."""


class EditError(EncoreFastError, RuntimeError):
    """A batch that could not be applied (non-finite values or update, a singular system).

    The batch was rolled back: weights, ``S``, solver state and history are as before it.
    """


class EditorConflictError(EncoreFastError, RuntimeError):
    """A second :class:`~encore_fast.Editor` on a model object another live editor holds."""


class HistoryError(EncoreFastError, RuntimeError):
    """An undo or save that needs batches the bounded history no longer keeps."""
