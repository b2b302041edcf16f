"""Command line: `glmvision demo-model DIR` and `glmvision serve`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `glmvision` command."""
    parser = argparse.ArgumentParser(prog="glmvision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="write the tiny random-weight demo model to DIR")
    demo.add_argument("directory")
    demo.add_argument("--seed", type=int, default=0)
    serve = commands.add_parser("serve", help="run gunicorn with deploy/gunicorn.conf.py")
    serve.add_argument("gunicorn_args", nargs=argparse.REMAINDER, help="extra gunicorn arguments")
    args = parser.parse_args(argv)

    if args.command == "demo-model":
        from .local.demo import build_demo_model

        started = time.perf_counter()
        path = build_demo_model(args.directory, seed=args.seed)
        print(f"demo model written to {path} in {time.perf_counter() - started:.2f}s")
        return 0
    if not GUNICORN_CONF.exists():
        print(f"gunicorn config not found at {GUNICORN_CONF}", file=sys.stderr)
        return 2
    os.chdir(GUNICORN_CONF.parent.parent)
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), *args.gunicorn_args, "wsgi:app"]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
