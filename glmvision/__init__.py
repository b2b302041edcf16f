"""glmvision: GLM-4.6V-Flash behind a Flask + gunicorn HTTP API."""

from __future__ import annotations

from typing import Any

# The one place the version is written: setup.cfg reads it (attr:), and `glmvision --version` prints it.
__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> Any:
    """`glmvision.create_app`, imported on first use: `import glmvision` alone loads no Flask or torch."""
    if name == "create_app":
        from glmvision.web.app import create_app

        return create_app
    raise AttributeError(f"module 'glmvision' has no attribute {name!r}")
