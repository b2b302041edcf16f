"""One model load at a time per GPU, across worker processes.

Each worker decides its dtype from the GPU's free memory. Two workers sharing a GPU that read it
at the same moment both see the same free memory and may both load 16-bit weights that only fit
once. An exclusive file lock per GPU, held from that reading until the weights are on the GPU,
makes the second worker read after the first has loaded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

log = logging.getLogger("glmvision")

# Loading 19.2 GiB from a local disk takes a minute or two; a first download from the hub inside
# the lock can take much longer. Past this the holder is taken to be stuck and the waiter goes on.
LOCK_WAIT_SECONDS = 30 * 60


def lock_directory(environ: Mapping[str, str] | None = None) -> str:
    """Where the lock files live: $XDG_RUNTIME_DIR (per user, in memory), else the temp directory."""
    environ = os.environ if environ is None else environ
    return environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


def lock_name(index: int, uuid: str | None = None) -> str:
    """The lock file's name: by GPU UUID when known, else by CUDA index."""
    # The UUID names the physical GPU whatever CUDA_VISIBLE_DEVICES each process was given;
    # an index only agrees between processes with the same CUDA_VISIBLE_DEVICES.
    if uuid:
        return f"glmvision-gpu-{re.sub(r'[^A-Za-z0-9-]', '', uuid)}.lock"
    return f"glmvision-cuda{index}.lock"


@contextmanager
def gpu_load_lock(
    index: int | None,
    uuid: str | None = None,
    *,
    directory: str | None = None,
    timeout: float = LOCK_WAIT_SECONDS,
    poll: float = 0.5,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[bool]:
    """Hold GPU `index`'s load lock for the block; yields whether it is held (never for the CPU)."""
    if index is None:
        yield False
        return
    path = os.path.join(directory or lock_directory(), lock_name(index, uuid))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("cannot open GPU load lock %s (%s): loading without it", path, exc)
        yield False
        return
    try:
        held = _acquire(fd, path, timeout, poll, on_wait)
        if held:
            # The holder's pid, for whoever waits and for an operator looking at the file.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield held
    finally:
        # Closing the descriptor releases the lock, as does the process dying.
        os.close(fd)


def _acquire(fd: int, path: str, timeout: float, poll: float, on_wait: Callable[[], None] | None) -> bool:
    """Take the exclusive lock, waiting at most `timeout` seconds; False if it stayed busy."""
    started = time.monotonic()
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            if waiting:
                log.info("GPU load lock %s taken after %.0fs", path, time.monotonic() - started)
            return True
        if not waiting:
            waiting = True
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            log.info("waiting for another worker (pid %s) to finish loading onto this GPU (%s)", holder, path)
            if on_wait is not None:
                on_wait()
        if time.monotonic() - started >= timeout:
            log.warning(
                "GPU load lock %s still busy after %.0fs: loading without it, the free-memory "
                "reading may not include the other worker's weights",
                path,
                timeout,
            )
            return False
        time.sleep(poll)
