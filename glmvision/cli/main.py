"""Command line: `glmvision ask`, `batch`, `serve`, `config`, `finetune`, `demo-model`, `audit-read`,
`audit-keygen`."""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

# The packaged gunicorn config and app: `glmvision serve` needs only the installed package.
GUNICORN_CONF = "python:glmvision.server.gunicorn_conf"
WSGI_APP = "glmvision.server.wsgi:app"
# `glmvision serve` flags: each sets its variable for the gunicorn config and the workers to read.
SERVE_FLAGS: tuple[tuple[str, str, str, type, str], ...] = (
    ("--bind", "HOST:PORT", "GLMVISION_BIND", str, "address to listen on (default 127.0.0.1:8080)"),
    (
        "--workers",
        "N",
        "GLMVISION_WORKERS",
        int,
        "worker processes, each with its own model copy (default 1)",
    ),
    (
        "--model",
        "PATH_OR_ID",
        "GLMVISION_MODEL",
        str,
        "GLM-4.6V-Flash directory or hub id (default: the demo)",
    ),
    ("--device", "DEVICE", "GLMVISION_DEVICE", str, "auto, cpu, cuda or cuda:N (default auto)"),
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `glmvision` command."""
    from glmvision.cli import config
    from glmvision.client import ask, batch, usage
    from glmvision.training import finetune

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "ask": ask.run,
        "batch": batch.run,
        "usage": usage.run,
        "finetune": finetune.run,
        "audit-keygen": _audit_keygen,
        "audit-read": _audit_read,
        "demo-model": _demo_model,
        "serve": _serve,
        "config": config.run,
    }
    args = _parser().parse_args(argv)
    return handlers[args.command](args)


def _parser() -> argparse.ArgumentParser:
    """The command line: the server's own commands, then the client's and training's."""
    from glmvision import __version__

    parser = argparse.ArgumentParser(prog="glmvision", description=__doc__)
    parser.add_argument("--version", action="version", version=f"glmvision {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="write the tiny random-weight demo model to DIR")
    demo.add_argument("directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--full-image-budget",
        action="store_true",
        help="GLM-4.6V-Flash's real image pixel limits (12,544 to 9,633,792 pixels, 28x28 per visual "
        "token) instead of the demo's ~20 visual tokens per image",
    )
    _add_serve(commands)
    _add_config(commands)
    _add_audit(commands)
    _add_client_and_training(commands)
    return parser


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run gunicorn with glmvision's packaged config",
        description="Run glmvision under gunicorn with glmvision.server.gunicorn_conf (the settings "
        "deploy/gunicorn.conf.py re-exports). Each flag overrides its "
        "GLMVISION_* variable; every other setting comes from the environment. Arguments after -- go "
        "to gunicorn itself.",
    )
    for flag, metavar, variable, kind, meaning in SERVE_FLAGS:
        serve.add_argument(flag, type=kind, metavar=metavar, help=f"{meaning}; sets {variable}")
    serve.add_argument("gunicorn_args", nargs="*", metavar="-- GUNICORN_ARG", help="extra gunicorn arguments")


def _add_config(commands: Any) -> None:
    from glmvision.cli import config

    config.add_arguments(
        commands.add_parser(
            "config",
            help="print the effective GLMVISION_* settings, or a .env template",
            description=config.DESCRIPTION,
        )
    )


def _add_audit(commands: Any) -> None:
    read = commands.add_parser("audit-read", help="decrypt an audit log and print its records as JSON lines")
    read.add_argument("path", metavar="PATH")
    read.add_argument("--key-file", metavar="FILE", help="file with the key(s); else $GLMVISION_AUDIT_KEY")
    read.add_argument("--since", metavar="ISO_TIME", help="only records from this time on (UTC if no zone)")
    read.add_argument("--until", metavar="ISO_TIME", help="only records before this time")
    read.add_argument("--request-id", metavar="ID", help="only the records of this request")
    keygen = commands.add_parser("audit-keygen", help="make a new audit log key (for GLMVISION_AUDIT_KEY)")
    keygen.add_argument(
        "--out", metavar="FILE", help="write it to this new file, mode 0600 (else print it to stdout)"
    )


def _add_client_and_training(commands: Any) -> None:
    from glmvision.client import ask, batch, usage
    from glmvision.training import finetune

    ask.add_arguments(
        commands.add_parser(
            "ask",
            help="ask a running server one question about one image",
            description="Ask a running glmvision one question about one image; the answer streams to "
            "stdout (reasoning, with --think, to stderr). Exit 0 answered, 1 failed, 2 bad usage.",
        )
    )
    batch.add_arguments(
        commands.add_parser(
            "batch",
            help="ask one question of every image in a folder, into a JSON lines file",
            description=batch.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    usage.add_arguments(
        commands.add_parser(
            "usage",
            help="print every named API key's usage by day (needs an admin key)",
            description=usage.__doc__,
        )
    )
    finetune.add_arguments(
        commands.add_parser(
            "finetune",
            help="train a LoRA adapter on image/prompt/answer lines, for GLMVISION_LORA",
            description=finetune.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def _audit_keygen(args: argparse.Namespace) -> int:
    from glmvision.ops.audit import new_key, write_secret

    if args.out is None:
        print(new_key())
        return 0
    try:
        write_secret(args.out, new_key() + "\n")
    except OSError as exc:  # FileExistsError included: a key is never overwritten
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}", "audit-keygen")
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from glmvision.backends.local.demo import build_demo_model

    started = time.perf_counter()
    path = build_demo_model(args.directory, seed=args.seed, full_image_budget=args.full_image_budget)
    print(f"demo model written to {path} in {time.perf_counter() - started:.2f}s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    for flag, _, variable, _, _ in SERVE_FLAGS:
        value = getattr(args, flag.removeprefix("--"))
        if value is not None:
            os.environ[variable] = str(value)
    command = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, *args.gunicorn_args, WSGI_APP]
    os.execv(sys.executable, command)
    return 0  # not reached


def _fail(message: str, command: str = "audit-read") -> int:
    print(f"glmvision {command}: {message}", file=sys.stderr)
    return 2


def _utc(text: str) -> datetime:
    from datetime import UTC

    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _record_time(record: dict[str, Any]) -> datetime | None:
    value = record.get("time")
    if not isinstance(value, str):
        return None
    try:
        return _utc(value)
    except ValueError:
        return None


def _audit_read(args: argparse.Namespace) -> int:
    """`glmvision audit-read`: every failure is one line on stderr and status 2, never a traceback."""
    import json

    from glmvision.ops.audit import AUDIT_KEY_ENV, AuditError, read_audit

    bounds: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        text = getattr(args, name)
        try:
            bounds[name] = _utc(text) if text else None
        except ValueError:
            return _fail(f"--{name}: not an ISO 8601 time: {text!r}")
    if args.key_file:
        try:
            key = Path(args.key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(f"cannot read key file {args.key_file}: {getattr(exc, 'strerror', None) or exc}")
    else:
        # Not load_settings(): reading a log back must not depend on the rest of a server's settings.
        key = os.environ.get(AUDIT_KEY_ENV, "")
    if not key.strip():
        return _fail(f"no key: give --key-file FILE or set {AUDIT_KEY_ENV}")
    if isinstance(sys.stdout, io.TextIOWrapper):
        # JSON is UTF-8, whatever the locale says; prompts are often not ASCII.
        sys.stdout.reconfigure(encoding="utf-8")
    since, until = bounds["since"], bounds["until"]
    try:
        for record in read_audit(args.path, key):
            if args.request_id is not None and record.get("request_id") != args.request_id:
                continue
            if since is not None or until is not None:
                moment = _record_time(record)
                if moment is None or (since and moment < since) or (until and moment >= until):
                    continue
            print(json.dumps(record, ensure_ascii=False))
        sys.stdout.flush()
    except AuditError as exc:
        return _fail(str(exc))
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            # The reader (head, less) went away: stop quietly, and keep Python from complaining at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        return _fail(f"cannot read {args.path}: {exc.strerror or exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
