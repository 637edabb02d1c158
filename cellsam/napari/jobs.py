"""Worker bodies that never raise: the widget's long jobs run in napari ``thread_worker``s as generators
that yield progress, and any exception a user can cause ends as a :class:`Failed` return value (shown as
a notification, with the traceback in the log), never as an exception in Qt's event loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Failed:
    """What a worker returns instead of raising: the message for the notification."""

    message: str


def message_of(e: BaseException) -> str:
    """The text to show for ``e`` (a KeyError's key without its quotes; the type when there is no text)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text or type(e).__name__


def guarded(gen: Generator[Any, Any, T]) -> Generator[Any, Any, T | Failed]:
    """Run a generator to its return value; any exception becomes :class:`Failed` (logged)."""
    try:
        return (yield from gen)
    except Exception as e:  # noqa: BLE001 - shown as a notification, with the traceback in the log
        log.info("cellsam napari job failed", exc_info=True)
        return Failed(message_of(e))


def returning(fn: Callable[[], T]) -> Generator[Any, Any, T]:
    """A generator that returns ``fn()`` without yielding (for ``yield from guarded(returning(fn))``)."""
    return fn()
    yield  # pragma: no cover - makes this a generator
