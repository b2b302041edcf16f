"""gunicorn settings and hooks for glmvision, inside the package so an installed wheel can serve:
`gunicorn -c python:glmvision.server.gunicorn_conf glmvision.server.wsgi:app` (what `glmvision serve` runs);
deploy/gunicorn.conf.py re-exports them for `gunicorn -c deploy/gunicorn.conf.py wsgi:app`.

Read by the gunicorn master, which never imports torch. With GLMVISION_ENGINE=process (the default)
the master spawns the engine processes, one per GPU, which hold the model; workers hold only the
processor. With GLMVISION_ENGINE=thread each worker loads its own model (CUDA cannot be
re-initialised in a forked child, so nothing is preloaded) and, with several GPUs visible, gets one
of its own: the master keeps the assignment on its worker objects, and a worker that replaces a dead
one takes over the dead one's GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import TYPE_CHECKING

from glmvision.backends.local.gpus import engine_devices, pick_gpu, visible_gpu_count, worker_device
from glmvision.backends.local.loading import check_source
from glmvision.core.config import (
    SHARED_DIR_ENV,
    ConfigError,
    load_server_settings,
    load_settings,
    warn_unknown_variables,
)

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

try:
    _settings = load_settings()
    _server = load_server_settings()
    # Every admitted request (running + queued) holds a thread while it waits for the model; the
    # spare threads answer probes and refuse the excess at once instead of queueing it in gunicorn.
    threads = _server.worker_threads(_settings)
    if _settings.backend == "local":  # with an upstream engine no model is loaded here
        check_source(_settings.model)
except ConfigError as exc:
    # One clear line, not a traceback: gunicorn prints this and exits.
    raise SystemExit(f"glmvision: {exc}") from None
warn_unknown_variables()
# prometheus-client's multiprocess mode: every worker writes its series into this directory and a
# scrape of any worker sums them. Set before any worker imports prometheus_client; a directory of
# our own per server (never one left by an earlier run: stale series would be summed in).
if _settings.metrics and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="glmvision-metrics-")
    _own_metrics_dir = True
else:
    _own_metrics_dir = False
# A directory of this server's that every worker shares (stored /v1/responses answers), removed at exit.
_shared_dir = tempfile.mkdtemp(prefix="glmvision-shared-")
os.environ[SHARED_DIR_ENV] = _shared_dir
# The model lives in engine processes the master starts, not in the workers.
_engine_processes = _settings.engine == "process" and _settings.backend == "local"
# Counted once, in the master, from CUDA_VISIBLE_DEVICES or the driver's /proc: CUDA is never touched here.
_gpu_count = visible_gpu_count()

bind = _server.bind
workers = _server.worker_processes(_settings, os.cpu_count())
# gthread, plus a lane of its own for /healthz and /readyz so probes never queue behind model work.
worker_class = "glmvision.server.workers.ProbeFirstWorker"
preload_app = False
# A loading model does not block the worker's heartbeat (it loads in a thread), so this only
# catches workers that are truly stuck.
timeout = _server.timeout
graceful_timeout = 30
keepalive = 5
# Request lines and headers stay small; bodies are bounded by GLMVISION_MAX_BODY_MB in the app.
limit_request_line = 8190
limit_request_fields = 100
# One line per request, the app's JSON request log (route, status, timings, no content): gunicorn's
# own access line said the same again in another format. `--access-logfile -` brings it back.
accesslog = None
errorlog = "-"
# glmvision needs no runtime control socket; several servers on one host must not share one.
control_socket_disable = True
# Method, path, status, size, milliseconds and the worker's pid: never bodies, never keys.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms pid=%(p)s'
logger_class = "glmvision.server.workers.AccessLogger"


def post_worker_init(worker):  # gunicorn passes the worker
    """Start loading this worker's model in the background; exit the worker if its model thread fails."""
    from glmvision.web.state import app_state

    state = app_state(worker.wsgi).service
    # A failed model thread has answered its requests already; a graceful exit lets gunicorn
    # start a fresh worker instead of one that fails every request from then on.
    state.backend.on_fatal = lambda: os.kill(os.getpid(), signal.SIGTERM)
    if state.settings.warmup:
        state.backend.warm_up()
    from glmvision.web.app import start_worker_threads

    start_worker_threads(worker.wsgi)


def pre_fork(server: Arbiter, worker: Worker) -> None:
    """In the master, before the fork: give the new worker the GPU the live workers use least."""
    if _engine_processes:
        return  # the engines hold the GPUs
    # gunicorn reaps a dead worker (drops it from WORKERS) before it forks the replacement, so the
    # dead worker's GPU is free again here and is the one picked.
    assigned = (getattr(live, "glmvision_gpu", None) for live in server.WORKERS.values())
    in_use = [gpu for gpu in assigned if gpu is not None]
    worker.glmvision_gpu = pick_gpu(in_use, _gpu_count)


def post_fork(server: Arbiter, worker: Worker) -> None:
    """In the new worker, before gunicorn imports the app: point its model at its own GPU."""
    device = worker_device(getattr(worker, "glmvision_gpu", None), _settings.device)
    if device is not None:
        os.environ["GLMVISION_DEVICE"] = device
        server.log.info("worker pid=%s uses %s", worker.pid, device)


def on_starting(server: Arbiter) -> None:
    """In the master, once: start the metrics directory empty (a given one may hold an old run's files),
    and with GLMVISION_ENGINE=process the engine process, before any worker is forked."""
    if _engine_processes:
        _start_engines(server)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and _settings.metrics:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))


def child_exit(server: Arbiter, worker: Worker) -> None:
    """In the master: a dead worker's live gauges leave the sums (its counters stay counted)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and _settings.metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def _start_engines(server: Arbiter) -> None:
    """Start the engine processes (one per GPU, one on CPU); their socket paths go to workers by env."""
    from glmvision.backends.engine.process import EngineSupervisor
    from glmvision.backends.engine.transport import SOCKET_ENV, socket_path

    runtime = tempfile.mkdtemp(prefix="glmv-engine-")  # 0700: only this user reaches the sockets
    devices = engine_devices(_settings.engines, _gpu_count, _settings.device)
    supervisors = [
        EngineSupervisor(str(socket_path(runtime, index)), device, server.log.info)
        for index, device in enumerate(devices)
    ]
    os.environ[SOCKET_ENV] = os.pathsep.join(supervisor.path for supervisor in supervisors)
    for supervisor in supervisors:
        supervisor.start()
    server.glmvision_engines = supervisors  # type: ignore[attr-defined]
    server.glmvision_runtime = runtime  # type: ignore[attr-defined]


def on_exit(server: Arbiter) -> None:
    """In the master, at shutdown: stop the engine process, remove the directories it made."""
    supervisors = getattr(server, "glmvision_engines", ())
    for supervisor in supervisors:
        supervisor.begin_stop()
    for supervisor in supervisors:
        supervisor.stop()
    if supervisors:
        shutil.rmtree(server.glmvision_runtime, ignore_errors=True)  # type: ignore[attr-defined]
    shutil.rmtree(_shared_dir, ignore_errors=True)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and _own_metrics_dir:
        shutil.rmtree(directory, ignore_errors=True)
