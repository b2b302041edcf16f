"""gunicorn settings for glmvision: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`.

Read by the gunicorn master, which never imports torch: each worker builds the app and loads its
own model (CUDA cannot be re-initialised in a forked child, so nothing is preloaded).
"""

from __future__ import annotations

from glmvision.config import load_settings

_settings = load_settings()

bind = _settings["GLMVISION_BIND"]
workers = _settings["GLMVISION_WORKERS"]
threads = _settings["GLMVISION_THREADS"]
worker_class = "gthread"
preload_app = False
# A loading model does not block the worker's heartbeat (it loads in a thread), so this only
# catches workers that are truly stuck.
timeout = _settings["GLMVISION_TIMEOUT"]
graceful_timeout = 30
keepalive = 5
# Request lines and headers stay small; bodies are bounded by GLMVISION_MAX_BODY_MB in the app.
limit_request_line = 8190
limit_request_fields = 100
accesslog = "-"
errorlog = "-"
# glmvision needs no runtime control socket; several servers on one host must not share one.
control_socket_disable = True
# Method, path, status, size, milliseconds and the worker's pid: never bodies, never keys.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms pid=%(p)s'


def post_worker_init(worker):  # gunicorn passes the worker
    """Start loading this worker's model in the background once the worker is up."""
    app = worker.wsgi
    if app.config["GLMVISION_WARMUP"]:
        app.extensions["glmvision.model"].warm_up()
