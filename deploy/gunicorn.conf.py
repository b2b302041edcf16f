"""gunicorn settings for glmvision: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`.

The settings and hooks live in the package (glmvision/server/gunicorn_conf.py), so an installed wheel
serves without this file; gunicorn reads every public name of this module, and the star import brings
them all (no setting or hook name starts with `_`).
"""

from glmvision.server.gunicorn_conf import *  # noqa: F403
