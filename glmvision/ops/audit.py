"""The audit log: one Fernet-encrypted JSON record per request, appended by every worker to one file.

Each record is a single line, `token + "\\n"`, appended with one `os.write` on an `O_APPEND` descriptor
while holding an exclusive `flock`, so lines from concurrent worker processes never interleave. Keys
are comma-separated: the first encrypts, all decrypt (rotation). Only a key holder can read the file
back, with `read_audit` or `glmvision audit-read`.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from glmvision.core.config import ConfigError

if TYPE_CHECKING:
    from glmvision.core.config import Settings

log = logging.getLogger("glmvision")

AUDIT_KEY_ENV = "GLMVISION_AUDIT_KEY"
AUDIT_LOG_ENV = "GLMVISION_AUDIT_LOG"
# While writes keep failing, warn on the first and then once per this many, not once per request.
_WARN_EVERY = 1000
# Fernet token layout: version byte, 8-byte time, 16-byte IV, AES-CBC blocks, 32-byte HMAC.
_FERNET_VERSION = 0x80
_FERNET_OVERHEAD = 1 + 8 + 16 + 32


class AuditError(Exception):
    """An audit file that cannot be read back: a bad key, a line the key cannot decrypt, a corrupted line."""


def new_key() -> str:
    """A fresh Fernet key, as text."""
    return Fernet.generate_key().decode("ascii")


def write_secret(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to a new file that only its owner may read or write (mode 0600, whatever the umask).

    An existing file is never replaced: FileExistsError. Every secret glmvision writes goes through here.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the creation mode is 0600 already; this states it whatever the umask did
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _split_keys(keys: str) -> list[str]:
    # Commas separate keys in the environment; a key file may also hold one per line.
    return [key for key in re.split(r"[,\s]+", keys.strip()) if key]


def parse_keys(keys: str) -> MultiFernet:
    """A MultiFernet from comma-separated keys (the first encrypts); ValueError naming the bad one."""
    parts = _split_keys(keys)
    if not parts:
        raise ValueError("no key given")
    fernets = []
    for number, key in enumerate(parts, start=1):
        try:
            fernets.append(Fernet(key))
        except ValueError:
            # Never echo the key itself: it is a secret, and error lines end up in logs.
            where = f"key {number} of {len(parts)}" if len(parts) > 1 else "the key"
            raise ValueError(
                f"{where} is not a valid Fernet key (32 url-safe base64 bytes; "
                f"`glmvision audit-keygen` makes one)"
            ) from None
    return MultiFernet(fernets)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class AuditLog:
    """Appends one encrypted record per request."""

    def __init__(self, path: str | os.PathLike[str], keys: str) -> None:
        """Open (creating with mode 0600) `path` for append; ConfigError for a bad key or path."""
        try:
            self._fernet = parse_keys(keys)
        except ValueError as exc:
            raise ConfigError(f"{AUDIT_KEY_ENV}: {exc}") from None
        self._path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        self._failures = 0
        self._dropped = 0
        try:
            self._fd, self._pid = self._open(), os.getpid()
        except OSError as exc:
            raise ConfigError(
                f"{AUDIT_LOG_ENV}: cannot open {self._path} for append: {exc.strerror or exc}"
            ) from None
        mode = stat.S_IMODE(os.fstat(self._fd).st_mode)
        if mode & 0o077:
            # Only warn: narrowing an operator's own file is not ours to do, and the content is encrypted.
            log.warning("audit log %s is readable by others (mode %o); 600 is advised", self._path, mode)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog | None:
        """The audit log the settings ask for; None when GLMVISION_AUDIT_LOG is empty."""
        if not settings.audit_log:
            return None
        if not settings.audit_key.get_secret_value():
            raise ConfigError(f"{AUDIT_LOG_ENV} is set but {AUDIT_KEY_ENV} is empty")
        return cls(settings.audit_log, settings.audit_key.get_secret_value())

    @property
    def path(self) -> Path:
        """The file records are appended to."""
        return self._path

    @property
    def dropped(self) -> int:
        """Records that could not be written since this log was opened."""
        return self._dropped

    def _open(self) -> int:
        # The mode applies only when the file is created: an existing file's mode is left alone.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self._path, flags, 0o600)

    def _descriptor(self) -> int:
        """The descriptor to append to, reopened after a fork or when the file was moved (rotation)."""
        reopen = self._pid != os.getpid()
        if not reopen:
            try:
                reopen = not _same_file(os.fstat(self._fd), os.stat(self._path))
            except FileNotFoundError:
                reopen = True
        if reopen:
            # After a fork the parent's open file description (and so its flock) would be shared.
            old = self._fd
            self._fd, self._pid = self._open(), os.getpid()
            try:
                os.close(old)
            except OSError:
                pass
        return self._fd

    def write(self, record: Mapping[str, Any]) -> None:
        """Encrypt `record` as one line and append it; failures are logged (never the content) and dropped."""
        try:
            plain = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            with self._lock:
                self._drop(f"the record is not JSON-serialisable ({type(exc).__name__})")
            return
        line = self._fernet.encrypt(plain) + b"\n"
        with self._lock:
            if self._closed:
                self._drop("the audit log is closed")
                return
            try:
                self._append(line)
            except OSError as exc:
                self._drop(f"{exc.strerror or type(exc).__name__}")
                return
            if self._failures:
                log.warning(
                    "audit log %s: writing again after %d record(s) dropped", self._path, self._failures
                )
                self._failures = 0

    def _append(self, line: bytes) -> None:
        fd = self._descriptor()
        # flock excludes other processes; threads of this one are kept apart by self._lock.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(fd).st_size
            written = 0
            try:
                written = os.write(fd, line)
                while written < len(line):  # a short write: finish the line while still holding the lock
                    more = os.write(fd, line[written:])
                    if more <= 0:
                        raise OSError("short write")
                    written += more
            except OSError:
                if written:
                    # A partial line would corrupt the next record too: cut it off again.
                    try:
                        os.ftruncate(fd, start)
                    except OSError:
                        pass
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _drop(self, reason: str) -> None:
        self._dropped += 1
        self._failures += 1
        if self._failures % _WARN_EVERY == 1:
            log.warning(
                "audit log %s: record dropped: %s (%d dropped in a row)", self._path, reason, self._failures
            )

    def close(self) -> None:
        """Close the file; later writes are dropped (with a warning)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _looks_like_token(line: bytes) -> bool:
    try:
        raw = base64.b64decode(line, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return False
    size = len(raw) - _FERNET_OVERHEAD
    return bool(raw) and raw[0] == _FERNET_VERSION and size >= 16 and size % 16 == 0


def read_audit(path: str | os.PathLike[str], key: str) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit file in order; AuditError naming the line that cannot be read."""
    try:
        fernet = parse_keys(key)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    return _records(Path(path), fernet)


def _records(path: Path, fernet: MultiFernet) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            token = raw.strip()
            if not token:
                continue
            try:
                plain = fernet.decrypt(token)
            except InvalidToken:
                if _looks_like_token(token):
                    reason = "cannot be decrypted with the given key(s) (a wrong key, or an altered line)"
                else:
                    reason = "is corrupted (not a Fernet token)"
                raise AuditError(f"{path}: line {number} {reason}") from None
            try:
                record = json.loads(plain)
            except ValueError:
                raise AuditError(f"{path}: line {number} decrypts to something that is not JSON") from None
            if not isinstance(record, dict):
                raise AuditError(f"{path}: line {number} decrypts to a {type(record).__name__}, not a record")
            yield record
