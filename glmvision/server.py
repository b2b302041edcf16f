"""gunicorn pieces that deploy/gunicorn.conf.py names: the access logger."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.glogging import Logger


class AccessLogger(Logger):
    """gunicorn's logger, with `%(p)s` as a bare pid (gunicorn writes `<1234>`)."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["p"] = str(os.getpid())
        return atoms
