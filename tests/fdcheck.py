"""File-descriptor leak checks for this process (Linux: ``/proc/self/fd``).

Typical use, *inside* a test so that lazily started session fixtures (a
server's first start, PgBouncer's log handle, the silent listener's sockets)
have opened their descriptors before the first snapshot::

    def test_no_leak(replicated, silent_listener):
        with assert_no_fd_leak(ignore=silent_listener.owned_fds):
            ...  # connect, fail, close

Threads that open descriptors concurrently (e.g. ``silent_listener``
accepting the connection the test just made) show up as leaks unless their
descriptors are ignored.  Garbage collection is not forced: a socket kept
alive only by a reference cycle is reported, since it stays open until the
collector happens to run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

__all__ = ["assert_no_fd_leak", "describe_fds", "is_open", "open_fds"]

_FD_DIR = "/proc/self/fd"


def open_fds() -> set[int]:
    """The descriptors open in this process now.

    The directory descriptor used to list ``/proc/self/fd`` appears in the
    listing but is closed by the time it returns; every listed number that is
    no longer open is dropped, which removes it.
    """
    return {fd for fd in map(int, os.listdir(_FD_DIR)) if is_open(fd)}


def is_open(fd: int) -> bool:
    """Whether descriptor *fd* is open in this process now."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _target(fd: int) -> str:
    try:
        return os.readlink(f"{_FD_DIR}/{fd}")
    except OSError as exc:
        return f"<closed: {exc.strerror}>"


def describe_fds(fds: Iterable[int]) -> str:
    """``"fd -> target"`` lines (``socket:[inode]``, ``pipe:[inode]``, a path...)."""
    return "\n".join(f"{fd} -> {_target(fd)}" for fd in sorted(fds))


@contextlib.contextmanager
def assert_no_fd_leak(*, ignore: Callable[[], Iterable[int]] | None = None) -> Iterator[None]:
    """Fail if the block leaves descriptors open that were not open before it.

    ``ignore`` is called after the final snapshot (so it also covers
    descriptors opened while the block ran) and returns descriptors that are
    expected to appear, such as those of a server thread in this process.
    """
    before = open_fds()
    yield
    after = open_fds()
    leaked = after - before
    if ignore is not None:
        leaked -= set(ignore())
    if leaked:
        raise AssertionError(f"{len(leaked)} file descriptor(s) leaked:\n{describe_fds(leaked)}")
