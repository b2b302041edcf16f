"""The encrypted audit log: round trip, no plaintext at rest, concurrent writers, failures, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from glmvision.core.config import ConfigError, load_settings
from glmvision.ops.audit import AuditError, AuditLog, new_key, read_audit

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "这是什么, what is this — naïve café 🐱"


def record(number: int, **extra: Any) -> dict[str, Any]:
    """A record shaped like the ones the service writes."""
    return {
        "time": f"2026-12-01T10:00:{number:02d}Z",
        "request_id": f"req-{number}",
        "key_id": "ab12cd34",
        "route": "/v1/chat/vision",
        "messages": [
            {
                "role": "user",
                "text": f"{PROMPT} #{number}",
                "images": [{"width": 64, "height": 48, "sha256": "0" * 64}],
            }
        ],
        "answer": f"一只猫 (cat) {number}",
        "reasoning": None,
        "finish_reason": "stop",
        **extra,
    }


def settings_for(path: Path, key: str) -> Any:
    return load_settings({"GLMVISION_AUDIT_LOG": str(path), "GLMVISION_AUDIT_KEY": key})


def write_records(path: Path, key: str, records: list[dict[str, Any]]) -> None:
    log = AuditLog.from_settings(settings_for(path, key))
    assert log is not None
    with log:
        for item in records:
            log.write(item)


def test_round_trip_keeps_order_and_unicode(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    records = [record(n) for n in range(5)]
    write_records(path, key, records)
    assert list(read_audit(path, key)) == records
    assert len(path.read_bytes().splitlines()) == 5


def test_file_holds_no_plaintext(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    write_records(path, key, [record(1)])
    raw = path.read_bytes()
    for secret in (PROMPT, "naïve", "what is this", "req-1", "一只猫", "finish_reason"):
        assert secret.encode("utf-8") not in raw
        assert json.dumps(secret).encode("ascii") not in raw  # nor \\u-escaped
    assert Fernet(key).decrypt(raw.strip())  # and it is really one Fernet token


def test_new_file_is_private_and_existing_mode_is_kept(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    old_umask = os.umask(0)  # the 0600 must come from the code, not from a kind umask
    try:
        write_records(path, key, [record(1)])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    existing = tmp_path / "existing.log"
    existing.touch()
    existing.chmod(0o640)
    write_records(existing, key, [record(2)])
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert list(read_audit(existing, key)) == [record(2)]


def test_wide_existing_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    path.touch()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="glmvision"):
        write_records(path, new_key(), [record(1)])
    assert "readable by others" in caplog.text


def test_no_audit_log_when_unset() -> None:
    assert AuditLog.from_settings(load_settings({})) is None


def test_wrong_key_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_records(path, new_key(), [record(1), record(2)])
    with pytest.raises(AuditError, match=r"line 1 .*wrong key"):
        list(read_audit(path, new_key()))


def test_corrupted_line_is_reported_by_number(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    write_records(path, key, [record(n) for n in range(4)])
    lines = path.read_bytes().splitlines(keepends=True)

    altered = bytearray(lines[2])
    altered[40] = ord("A") if altered[40] != ord("A") else ord("B")  # a flipped byte: the HMAC fails
    path.write_bytes(b"".join([*lines[:2], bytes(altered), *lines[3:]]))
    reader = read_audit(path, key)
    assert [next(reader), next(reader)] == [record(0), record(1)]
    with pytest.raises(AuditError, match=r"line 3 "):
        next(reader)

    path.write_bytes(b"".join([lines[0], b"not a token at all!\n", *lines[1:]]))
    with pytest.raises(AuditError, match=r"line 2 is corrupted"):
        list(read_audit(path, key))

    path.write_bytes(b"".join([*lines[:3], lines[3][:50]]))  # a torn last line
    with pytest.raises(AuditError, match=r"line 4 "):
        list(read_audit(path, key))


def test_key_rotation(tmp_path: Path) -> None:
    path, old, new = tmp_path / "audit.log", new_key(), new_key()
    write_records(path, old, [record(1)])
    write_records(path, f"{new},{old}", [record(2)])  # the first key encrypts from now on
    assert list(read_audit(path, f"{new}, {old}")) == [record(1), record(2)]
    with pytest.raises(AuditError, match="line 1 "):
        list(read_audit(path, new))
    lines = path.read_bytes().splitlines()
    assert Fernet(new).decrypt(lines[1])
    with pytest.raises(AuditError, match="line 2 "):
        list(read_audit(path, old))


@pytest.mark.parametrize("key", ["not-a-key", "", " , ", "short" * 3])
def test_bad_key_is_a_config_error(tmp_path: Path, key: str) -> None:
    path = tmp_path / "audit.log"
    with pytest.raises(ConfigError, match="GLMVISION_AUDIT_KEY") as caught:
        AuditLog(path, key)
    assert "\n" not in str(caught.value)
    if key.strip(" ,"):
        assert key not in str(caught.value)  # the (would-be) secret is never echoed
    assert not path.exists()  # nothing is created for a log that cannot be written


def test_second_bad_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 2 of 2"):
        AuditLog(tmp_path / "audit.log", f"{new_key()},oops")


def test_bad_key_in_read_audit_is_an_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="not a valid Fernet key"):
        read_audit(tmp_path / "audit.log", "oops")


@pytest.mark.parametrize("where", ["missing-dir/audit.log", "a-directory", "a-file/audit.log"])
def test_unopenable_path_is_a_config_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"^GLMVISION_AUDIT_LOG: cannot open .* for append") as caught:
        AuditLog.from_settings(settings_for(tmp_path / where, new_key()))
    assert "\n" not in str(caught.value)


WRITER = """
import sys
from glmvision.ops.audit import AuditLog
path, key, writer = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = AuditLog(path, key)
print("ready", flush=True)
sys.stdin.readline()  # start together with the others
for seq in range(200):
    # Varied sizes, up to ~30 kB a line: a writer that split lines into buffered chunks would interleave.
    log.write({"writer": writer, "seq": seq, "text": f"写{writer}-{seq}:" + "x" * (seq % 7 * 3000)})
log.close()
"""


def test_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), key, str(number)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for number in range(4)
    ]
    try:
        for process in writers:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in writers:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.close()
        for process in writers:
            assert process.wait(timeout=120) == 0
    finally:
        for process in writers:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()

    assert len(path.read_bytes().splitlines()) == 800
    records = list(read_audit(path, key))
    assert len(records) == 800
    for number in range(4):
        mine = [item for item in records if item["writer"] == number]
        assert [item["seq"] for item in mine] == list(range(200))
        assert all(item["text"] == f"写{number}-{s}:" + "x" * (s % 7 * 3000) for s, item in enumerate(mine))


def test_threads_of_one_process_never_interleave(tmp_path: Path) -> None:
    import threading

    path, key = tmp_path / "audit.log", new_key()
    log = AuditLog(path, key)
    start = threading.Barrier(4)

    def work(number: int) -> None:
        start.wait()
        for seq in range(50):
            log.write({"writer": number, "seq": seq, "text": "y" * (seq % 5 * 5000)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    records = list(read_audit(path, key))
    assert len(records) == 200
    for number in range(4):
        assert [item["seq"] for item in records if item["writer"] == number] == list(range(50))


def test_unwritable_file_drops_without_raising_or_logging_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, key = tmp_path / "audit.log", new_key()
    log = AuditLog(path, key)
    log.write(record(1))
    # The file is moved away and a directory takes its place: reopening fails, even for root.
    path.rename(tmp_path / "audit.log.1")
    path.mkdir()
    with caplog.at_level(logging.DEBUG, logger="glmvision"):
        log.write(record(2))
        log.write(record(3))
    assert log.dropped == 2
    warnings = [item for item in caplog.records if item.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per failure streak, not one per request
    assert "dropped" in warnings[0].getMessage()
    for secret in ("req-2", "req-3", PROMPT, "一只猫", "what is this"):
        assert secret not in caplog.text
    path.rmdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glmvision"):
        log.write(record(4))
    assert "writing again after 2" in caplog.text
    log.close()
    assert list(read_audit(tmp_path / "audit.log.1", key)) == [record(1)]
    assert list(read_audit(path, key)) == [record(4)]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_drops_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    path.symlink_to("/dev/full")  # every write fails with ENOSPC
    log = AuditLog(path, new_key())
    with caplog.at_level(logging.WARNING, logger="glmvision"):
        log.write(record(7))
    log.close()
    assert log.dropped == 1
    assert "No space left" in caplog.text
    assert "req-7" not in caplog.text and PROMPT not in caplog.text


def test_unserialisable_record_and_closed_log_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, key = tmp_path / "audit.log", new_key()
    log = AuditLog(path, key)
    with caplog.at_level(logging.WARNING, logger="glmvision"):
        log.write({"secret-prompt": object()})
        log.close()
        log.write(record(1))
    assert log.dropped == 2
    assert "secret-prompt" not in caplog.text
    assert path.read_bytes() == b""


def test_rotated_file_is_reopened(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    with AuditLog(path, key) as log:
        log.write(record(1))
        path.rename(tmp_path / "audit.log.1")  # what logrotate does
        log.write(record(2))
    assert list(read_audit(tmp_path / "audit.log.1", key)) == [record(1)]
    assert list(read_audit(path, key)) == [record(2)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_forked_child_writes_with_its_own_descriptor(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    log = AuditLog(path, key)
    log.write(record(1))
    parent_fd = log._fd
    after_first = os.lseek(parent_fd, 0, os.SEEK_CUR)
    child = os.fork()  # what gunicorn does to a preloaded app
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            log.write(record(2))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # A shared open file description (whose flock would not keep parent and child apart) would have
    # moved with the child's append; the child's own descriptor leaves the parent's where it was.
    assert os.lseek(parent_fd, 0, os.SEEK_CUR) == after_first
    log.write(record(3))
    log.close()
    assert list(read_audit(path, key)) == [record(1), record(2), record(3)]


# The command line, as real processes.


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "glmvision.cli.main", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environ,
        cwd=ROOT,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr


def test_cli_keygen_prints_a_valid_key() -> None:
    first, second = cli("audit-keygen"), cli("audit-keygen")
    assert first.returncode == 0 and second.returncode == 0
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    Fernet(key)  # raises for anything that is not a key
    assert key != second.stdout.strip()


def test_cli_reads_with_env_key_and_key_file(tmp_path: Path) -> None:
    path, old, new = tmp_path / "audit.log", new_key(), new_key()
    records = [record(1), record(2, time="2026-12-01T11:00:00+01:00"), record(3)]
    write_records(path, old, records[:1])
    write_records(path, f"{new},{old}", records[1:])

    from_env = cli("audit-read", str(path), env={"GLMVISION_AUDIT_KEY": f"{new},{old}"})
    assert from_env.returncode == 0, from_env.stderr
    assert [json.loads(line) for line in from_env.stdout.splitlines()] == records
    assert PROMPT in from_env.stdout  # readable UTF-8, not \\u escapes

    key_file = tmp_path / "keys"
    key_file.write_text(f"{new}\n{old}\n")
    from_file = cli("audit-read", str(path), "--key-file", str(key_file), env={"GLMVISION_AUDIT_KEY": "x"})
    assert from_file.returncode == 0, from_file.stderr
    assert [json.loads(line) for line in from_file.stdout.splitlines()] == records

    by_id = cli("audit-read", str(path), "--key-file", str(key_file), "--request-id", "req-2")
    assert [json.loads(line) for line in by_id.stdout.splitlines()] == [records[1]]
    # record 2 is 10:00 UTC (11:00+01:00): --since is compared as a time, not as text
    since = cli("audit-read", str(path), "--key-file", str(key_file), "--since", "2026-12-01T10:00:02")
    assert [json.loads(line)["request_id"] for line in since.stdout.splitlines()] == ["req-3"]
    bounds = ["--since", "2026-12-01T10:00:00Z", "--until", "2026-12-01T10:00:02Z"]
    window = cli("audit-read", str(path), "--key-file", str(key_file), *bounds)
    assert [json.loads(line)["request_id"] for line in window.stdout.splitlines()] == ["req-1", "req-2"]


def test_cli_errors_are_one_line_and_status_2(tmp_path: Path) -> None:
    path, key = tmp_path / "audit.log", new_key()
    write_records(path, key, [record(1), record(2)])

    assert_one_line_error(cli("audit-read", str(path), env={"GLMVISION_AUDIT_KEY": new_key()}), "line 1")
    assert_one_line_error(cli("audit-read", str(path)), "GLMVISION_AUDIT_KEY")
    assert_one_line_error(
        cli("audit-read", str(tmp_path / "nope.log"), env={"GLMVISION_AUDIT_KEY": key}), "nope.log"
    )
    assert_one_line_error(cli("audit-read", str(path), "--key-file", str(tmp_path / "no-keys")), "no-keys")
    assert_one_line_error(cli("audit-read", str(path), env={"GLMVISION_AUDIT_KEY": "garbage"}), "Fernet key")
    assert_one_line_error(
        cli("audit-read", str(path), "--since", "yesterday", env={"GLMVISION_AUDIT_KEY": key}), "--since"
    )

    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"@@@ garbage @@@\n")
    corrupted = cli("audit-read", str(path), env={"GLMVISION_AUDIT_KEY": key})
    assert corrupted.returncode == 2
    assert "Traceback" not in corrupted.stderr
    assert len(corrupted.stderr.strip().splitlines()) == 1
    assert "line 2" in corrupted.stderr
    assert [json.loads(line) for line in corrupted.stdout.splitlines()] == [record(1)]  # what came before
