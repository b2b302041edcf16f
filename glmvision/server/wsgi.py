"""The app gunicorn serves: `glmvision.server.wsgi:app` (wsgi.py at the repository root re-exports it)."""

from __future__ import annotations

from gunicorn.errors import AppImportError

from glmvision.core.config import ConfigError
from glmvision.web.app import create_app

try:
    # gunicorn's master has warned about unknown GLMVISION_* variables once; its workers need not.
    app = create_app(warn_unknown=False)
except ConfigError as exc:
    # A setting only the app checks (allowlists, proxies, key files): gunicorn prints this one line
    # and stops ("App failed to load"), with the traceback only at debug level.
    raise AppImportError(f"glmvision: {exc}") from None
