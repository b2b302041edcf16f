"""Grammar compilation in child processes, so a schema that compiles too long can be stopped.

xgrammar compiles in C++ and cannot be interrupted: a thread compiling `"pattern": "^a{100000}$"`
keeps a core (and the GIL-free parts of the worker) busy for minutes. A compiler process can be
killed. Each holds its own xgrammar compilers, built from the raw vocabularies the worker made,
compiles at a lower priority than the model, and sends back the compiled grammar serialized; the
worker deserializes it against its own tokenizer info. A pool of a few such processes, each
started when first needed, serves a worker's requests; one that runs past its budget (or whose
client hung up, or whose request ran out of time) is killed and replaced.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("glmvision")

# How much lower than the worker a compiler runs (os.nice): the lowest, so the model keeps the CPU.
NICENESS = 19
# How often a waiting request looks at its client and its deadline.
POLL_SECONDS = 0.02
# How often a compiler process checks that its worker is still there.
PARENT_CHECK_SECONDS = 0.5
# A compiler process that is not ready this long after starting is taken for broken.
START_SECONDS = 60.0
# How many threads one compiler process compiles with (xgrammar's token-mask cache, per rule).
COMPILE_THREADS = 2
# The largest compiled grammar sent back, serialized: reading one back costs the worker ~20 ms of
# CPU per MB (its JSON grows with the square of an array's nesting: 8 MB at 100 deep, 512 tokens).
LARGEST_GRAMMAR = 64 << 20


@dataclass(frozen=True)
class Vocabularies:
    """What a compiler process builds its tokenizers from: GrammarBook's two raw vocabularies."""

    json: list[bytes]  # for JSON schemas: no tool-call tags
    call: list[bytes]  # for tool calls: the tags as whole tokens
    vocab_size: int
    stop_ids: list[int]

    def tokenizer_info(self, kind: str) -> Any:
        """xgrammar's tokenizer for `kind` ("json" or "call"), the same in the worker and the child."""
        import xgrammar

        words = self.json if kind == "json" else self.call
        return xgrammar.TokenizerInfo(
            words, xgrammar.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
        )


@dataclass(frozen=True)
class GrammarLimits:
    """GLMVISION_GRAMMAR_*: the compile budget, the compiler processes, the cache's size."""

    timeout: float = 5.0  # seconds one compile may take
    workers: int = 1  # compiler processes per worker
    cache_bytes: int = 256 << 20  # compiled grammars kept, by xgrammar's own measure of their size


class CompileFailed(Exception):
    """xgrammar refused the grammar (its message, for the client)."""


class TooSlow(Exception):
    """The compile ran past its budget; its process was killed."""


class TooLarge(Exception):
    """The compiled grammar is too large to send back (LARGEST_GRAMMAR, serialized)."""


class Died(Exception):
    """The compiler process ended without an answer (killed for memory, say)."""


class NotStarted(Exception):
    """A compiler process could not be started (or died starting: the worker shutting down, say)."""


class Busy(Exception):
    """Every compiler process stayed busy for as long as the request could wait."""


class Abandoned(Exception):
    """The request's client hung up or its deadline passed; the compile was stopped."""

    def __init__(self, gone: bool) -> None:
        super().__init__("client gone" if gone else "deadline passed")
        self.gone = gone


def _die_with_parent(parent: int) -> None:
    """Exit once the worker is gone (killed with SIGKILL, say), even in the middle of a compile."""

    # Not PR_SET_PDEATHSIG: that fires when the thread that started this process ends, and threads
    # that start compilers come and go.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(inbox: Connection, outbox: Connection) -> None:
    """A compiler process: compile what arrives, send back the serialized grammar or the error."""
    os.nice(NICENESS)
    _die_with_parent(int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid())
    # Ctrl-C in a terminal, or a SIGTERM to gunicorn's whole process group, is the worker's to handle:
    # this process ends with it, and dying first would fail the compile of a request still served.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    vocabularies = Vocabularies(*inbox.recv())
    import xgrammar

    compilers = {
        kind: xgrammar.GrammarCompiler(
            vocabularies.tokenizer_info(kind), max_threads=COMPILE_THREADS, cache_enabled=False
        )
        for kind in ("json", "call")
    }
    outbox.send(("ready", ""))
    while True:
        try:
            kind, text, largest = inbox.recv()
        except (EOFError, OSError):
            return  # the worker is gone or let this process go
        try:
            if kind == "json":
                # No free whitespace: a model could otherwise spend its whole budget on it.
                grammar = compilers["json"].compile_json_schema(text, any_whitespace=False, strict_mode=True)
            else:
                grammar = compilers["call"].compile_structural_tag(text)
            serialized = grammar.serialize_json()
            if len(serialized) > largest:
                outbox.send(("too_large", str(len(serialized))))
            else:
                outbox.send(("ok", serialized))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors (and their subclasses)
            outbox.send(("error", str(exc) or type(exc).__name__))


class _Process:
    """One compiler process and the worker's ends of its two pipes."""

    def __init__(self, vocabularies: Vocabularies) -> None:
        # A fresh interpreter running this file, not multiprocessing: fork would copy torch's threads
        # (and CUDA) broken, and spawn re-runs the worker's __main__, whatever that is. -P keeps this
        # file's folder (glmvision/backends/local, whose modules shadow others' names) off sys.path.
        child_reads, worker_writes = os.pipe()
        worker_reads, child_writes = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-P", __file__, str(child_reads), str(child_writes), str(os.getpid())],
                pass_fds=(child_reads, child_writes),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(worker_writes)
            os.close(worker_reads)
            raise
        finally:
            os.close(child_reads)
            os.close(child_writes)
        self.inbox = Connection(worker_writes, readable=False)  # what the child reads
        self.outbox = Connection(worker_reads, writable=False)  # what it answers
        self.started = time.monotonic()
        self.ready = False
        # Plain values: a pickled Vocabularies would name glmvision's module, which this process,
        # running the file alone, may not find on its path.
        words = vocabularies
        self.inbox.send((words.json, words.call, words.vocab_size, words.stop_ids))

    def kill(self) -> None:
        """Stop it now, whatever it is doing (SIGKILL), and reap it."""
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        finally:
            self.inbox.close()
            self.outbox.close()


class CompilerPool:
    """A few compiler processes, lent out one compile at a time."""

    def __init__(self, vocabularies: Vocabularies, workers: int = 1, largest: int = LARGEST_GRAMMAR) -> None:
        self._vocabularies = vocabularies
        self._largest = largest  # bytes of the largest grammar sent back, serialized
        self._size = max(1, workers)
        self._idle: list[_Process] = []
        self._lent = 0
        self._cond = threading.Condition()
        self.killed = 0  # compiler processes killed (past the budget, or their request was abandoned)

    def compile(
        self,
        kind: str,
        text: str,
        budget: float,
        deadline: float,
        gone: Callable[[], bool] = lambda: False,
    ) -> str:
        """The serialized compiled grammar of `text` ("json" schema or "call" structural tag).

        Waits up to `budget` seconds for a free process (else Busy), then gives the compile itself
        `budget` seconds (else TooSlow); stops at once when `gone()` or the monotonic `deadline`
        passes (Abandoned). CompileFailed carries xgrammar's message; TooLarge, the size of a
        grammar too large to send back."""
        process = self._borrow(min(time.monotonic() + budget, deadline), deadline, gone)
        healthy = False
        try:
            self._wait_ready(process, deadline, gone)
            process.inbox.send((kind, text, self._largest))
            try:
                outcome, payload = self._result(process, time.monotonic() + budget, deadline, gone)
            except Died as exc:  # a schema that takes the compiler down is too complex as well
                raise TooSlow(str(exc)) from None
            healthy = True
        finally:
            self._give_back(process, healthy)
        if outcome == "error":
            raise CompileFailed(payload)
        if outcome == "too_large":
            raise TooLarge(payload)
        return payload

    def close(self) -> None:
        """Stop every idle compiler process (a lent one is stopped when it comes back)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._size = 0
        for process in idle:
            process.kill()

    def processes(self) -> list[int]:
        """The pids of the idle compiler processes (for tests and diagnostics)."""
        with self._cond:
            return [process.process.pid for process in self._idle]

    def _borrow(self, until: float, deadline: float, gone: Callable[[], bool]) -> _Process:
        with self._cond:
            while not self._idle and self._lent >= self._size:
                now = time.monotonic()
                if now >= deadline or gone():
                    raise Abandoned(gone=now < deadline)
                if now >= until:
                    raise Busy()
                self._cond.wait(min(until - now, POLL_SECONDS * 5))
            self._lent += 1
            while self._idle:
                process = self._idle.pop()
                if process.process.poll() is None:
                    return process
                process.kill()  # it died idle (the OOM killer, say): not this schema's fault
        try:
            return _Process(self._vocabularies)  # started outside the lock: it takes ~0.1 s
        except OSError as exc:
            self._give_back(None, False)
            raise NotStarted(f"starting a grammar compiler process failed: {exc!r}") from None
        except BaseException:
            self._give_back(None, False)
            raise

    def _give_back(self, process: _Process | None, healthy: bool) -> None:
        if process is not None and not healthy:
            process.kill()
            with self._cond:
                self.killed += 1
            # Its successor starts now, in the background: the next compile need not wait as long.
            try:
                threading.Thread(target=self._replace, name="glmvision-grammar-start", daemon=True).start()
            except RuntimeError:  # the interpreter is shutting down: no successor is needed
                pass
        with self._cond:
            self._lent -= 1
            keep = process is not None and healthy and len(self._idle) + self._lent < self._size
            if keep:
                assert process is not None
                self._idle.append(process)
            self._cond.notify()
        if process is not None and healthy and not keep:
            process.kill()

    def _replace(self) -> None:
        try:
            process = _Process(self._vocabularies)
        except OSError:
            log.exception("starting a grammar compiler process failed")
            return
        with self._cond:
            keep = len(self._idle) + self._lent < self._size
            if keep:
                self._idle.append(process)
                self._cond.notify()
        if not keep:
            process.kill()

    def _wait_ready(self, process: _Process, deadline: float, gone: Callable[[], bool]) -> None:
        """Wait for a new process to be ready: its start-up is not the compile's to pay for."""
        if process.ready:
            return
        try:
            outcome, _ = self._result(process, process.started + START_SECONDS, deadline, gone)
        except (TooSlow, Died) as exc:
            raise NotStarted(f"the grammar compiler process did not start: {exc!r}") from None
        if outcome != "ready":
            raise NotStarted(f"the grammar compiler process started badly: {outcome}")
        process.ready = True

    def _result(
        self, process: _Process, until: float, deadline: float, gone: Callable[[], bool]
    ) -> tuple[str, str]:
        while True:
            now = time.monotonic()
            wait = min(until, deadline) - now
            if process.outbox.poll(max(0.0, min(wait, POLL_SECONDS))):
                try:
                    outcome, payload = process.outbox.recv()
                except (EOFError, OSError):
                    code = process.process.poll()
                    raise Died(f"the grammar compiler process died (exit code {code})") from None
                return str(outcome), str(payload)
            now = time.monotonic()
            if now >= deadline:
                raise Abandoned(gone=False)
            if now >= until:
                raise TooSlow()
            if gone():
                raise Abandoned(gone=True)


if __name__ == "__main__":  # a compiler process (see _Process), given its two pipes' descriptors
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
