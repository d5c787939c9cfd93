"""Work on the second core: a function run in a forked child while the caller goes on (issue 15).

A forked child starts with a copy of everything the parent holds (the graph, the calibrated ranges)
without serializing any of it; only the function's result (a small dict) crosses back, pickled
through a pipe. Used where an independent piece of a large job (optimize's never-worse baseline,
inspect's TensorRT prediction) would otherwise run after the rest. On small graphs, on platforms
without ``fork``, in processes running other Python threads and under ``QDQSURGEON_NO_FORK=1`` the
function runs in the caller, at once; the result is the same either way. If the child dies (killed, out of memory) or raises, ``result``
runs the fallback in the caller, so a failing child costs time, never the answer.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from typing import Any, Callable, Generic, TypeVar

__all__ = ["Background", "FORK_NODES", "can_fork"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Graphs with at least this many nodes send independent work to a forked child; smaller ones run it in
#: turn (a fork and a pipe cost milliseconds; the work on a graph this size costs about a second).
FORK_NODES = 4000


_in_child = False  # set in a forked child: it does its work in turn (two cores, one child at a time each)


def can_fork(nodes: int) -> bool:
    """Whether work on a graph of ``nodes`` nodes goes to a forked child: never from inside one, and never
    from a process running other Python threads (an application calling the API from a thread pool, a
    notebook kernel), whose locks a forked child could inherit held."""
    return (nodes >= FORK_NODES and not _in_child and threading.active_count() == 1
            and "fork" in multiprocessing.get_all_start_methods() and not os.environ.get("QDQSURGEON_NO_FORK"))


class Background(Generic[T]):
    """``fn()`` in a forked child when ``fork``, else now; :meth:`result` gives its value.

    ``fallback`` (default ``fn``) computes the value in the caller when the child fails: pass one
    when ``fn`` reads state the caller changes after the fork.
    """

    def __init__(self, fn: Callable[[], T], *, fork: bool, fallback: Callable[[], T] | None = None,
                 name: str = "qdqsurgeon-worker") -> None:
        self._fallback = fallback or fn
        self.forked = fork
        self._proc: Any = None
        self._conn: Any = None
        self._value: Any = None
        self._done = False
        if not fork:
            self._value, self._done = fn(), True
            return
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)

        def child() -> None:
            global _in_child
            _in_child = True
            try:
                send.send(("ok", fn()))
            except BaseException as exc:  # the parent computes it instead
                send.send(("error", repr(exc)))
            finally:
                send.close()

        for stream in (sys.stdout, sys.stderr):  # else the child would flush the parent's pending output again
            if stream is not None:
                stream.flush()
        self._proc = ctx.Process(target=child, name=name, daemon=True)
        self._proc.start()
        send.close()
        self._conn = recv

    def result(self) -> T:
        if self._done:
            return self._value
        self._done = True
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError) as exc:  # the child died without a word
            status, payload = "error", repr(exc)
        self.close()
        if status == "ok":
            self._value = payload
        else:
            logger.debug("background work failed (%s); doing it in this process", payload)
            self._value = self._fallback()
        return self._value

    def close(self, kill: bool = False) -> None:
        """Wait for the child (``kill``: stop it first); the result, if not yet read, is dropped."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            self._proc.join()
            self._proc = None
