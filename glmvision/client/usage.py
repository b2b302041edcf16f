"""`glmvision usage`: every named key's usage by day, from a server's GET /v1/usage (an admin key's)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from glmvision.client.http import ClientError, Server, send

COLUMNS = ("day", "key", "requests", "prompt_tokens", "completion_tokens", "image_tokens", "images", "errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server, the admin key, and how many days to show."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="glmvision's base URL (default $GLMVISION_SERVER, else http://127.0.0.1:8080)",
    )
    parser.add_argument("--key", metavar="K", help="an admin API key (default $GLMVISION_KEY)")
    parser.add_argument("--days", type=int, default=7, metavar="N", help="the last N days shown (default 7)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds to wait (default 30)"
    )


def fetch_usage(server: Server) -> dict[str, Any]:
    """GET /v1/usage; the server's error raised as a ClientError."""
    report: dict[str, Any] = send(server, "GET", "/v1/usage").json()
    return report


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table, one line per key and day, with a header."""
    cells = [list(COLUMNS)] + [[str(row.get(column, "")) for column in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the usage table; exit 0, 1 when the server refused or could not be reached, 2 bad usage."""
    try:
        server = Server.from_args(args.server, args.key, args.timeout)
        report = fetch_usage(server)
    except ClientError as exc:
        print(f"glmvision usage: {exc.message} ({exc.code})", file=sys.stderr)
        return 2 if exc.code == "usage" else 1
    days = sorted({row["day"] for row in report.get("data", [])}, reverse=True)[: max(1, args.days)]
    rows = [row for row in report.get("data", []) if row["day"] in days]
    sys.stdout.write(table(rows))
    if not report.get("shared", True):
        print(
            "note: the server counts usage per worker (no GLMVISION_USAGE_STORAGE_URI=redis://)",
            file=sys.stderr,
        )
    return 0
