"""The backend seam: mypy checks it (and that both backends satisfy it), and what it reports is what
/readyz and /v1/models show."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

from flask.testing import FlaskClient

from glmvision.backends.local.backend import LocalBackend
from glmvision.web.state import app_state

ROOT = Path(__file__).resolve().parent.parent

# A backend short of the protocol (no health()): mypy must refuse it where a Backend is wanted, which
# shows the check has teeth rather than passing on everything.
SHORT_BACKEND = '''
from collections.abc import Callable

from glmvision.core.backend import Backend, Capabilities, Submission, Submitted, Ticket


class Short:
    on_fatal: Callable[[], None]
    on_batch: Callable[[int], None]

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def warm_up(self) -> None:
        pass

    def stall(self, seconds: float) -> None:
        pass

    def admit(self) -> Ticket:
        raise NotImplementedError

    def submit(self, submission: Submission, ticket: Ticket) -> Submitted:
        raise NotImplementedError


def short() -> Backend:
    return Short()
'''


def seam_files() -> list[str]:
    """The modules setup.cfg [mypy] checks."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return [name.strip() for name in config["mypy"]["files"].split(",") if name.strip()]


def test_mypy_passes_on_the_seam_and_refuses_a_backend_short_of_it(tmp_path: Path) -> None:
    files = seam_files()
    assert "glmvision/backends/local/backend.py" in files and "glmvision/core/backend.py" in files
    probe = tmp_path / "short_backend.py"
    probe.write_text(SHORT_BACKEND)
    # A cache of its own: a shared one replays the probe's errors under an earlier run's path.
    mypy = [sys.executable, "-m", "mypy", "--config-file=setup.cfg", f"--cache-dir={tmp_path / 'cache'}"]
    run = subprocess.run(
        [*mypy, *files, str(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    seam_errors = [line for line in errors if not line.startswith(str(probe))]
    assert seam_errors == [], run.stdout
    assert len(errors) == 1 and 'got "Short", expected "Backend"' in errors[0], run.stdout
    assert "health" in run.stdout  # mypy names the missing member
    assert run.returncode == 1


def test_health_and_capabilities_are_what_readyz_and_models_show(client: FlaskClient) -> None:
    backend = app_state(client.application).service.backend
    assert isinstance(backend, LocalBackend)

    before = backend.capabilities()
    assert before.model.device is None and before.revision is None and before.image_fit is None
    assert backend.health().status == "not_loaded" and not backend.health().ready
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json() == {"ready": False, "status": "not_loaded"}
    assert client.get("/v1/models").get_json()["data"][0]["ready"] is False

    backend.holder.get(timeout=60)
    health, capabilities = backend.health(), backend.capabilities()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.get_json()
    assert health.ready and body["ready"] is True and body["status"] == health.status == "ready"
    assert health.model is not None
    assert body["model"] == capabilities.model.as_dict() == health.model.as_dict()
    assert body["engine"] == dict(health.engine or {})
    assert body["engine"]["capacity"] > 0 and body["engine"]["active"] == 0
    assert health.occupancy == 0.0 and health.gauges.loaded and health.gauges.active == 0
    assert health.gpu_peak is None and health.gauges.gpus == ()  # the demo model runs on CPU
    assert health.stalled_s == 0.0  # idle

    cards = client.get("/v1/models").get_json()["data"]
    assert [card["id"] for card in cards] == [capabilities.model_names[0]]
    assert cards[0]["ready"] is True
    assert {key: cards[0][key] for key in ("id", "demo", "device", "dtype")} == capabilities.model.as_dict()
    assert capabilities.model.demo and capabilities.model.device == "cpu"
    assert capabilities.adapters == ()
    assert capabilities.revision is not None and capabilities.revision.startswith(capabilities.model.id)
    assert capabilities.image_fit is not None
    width, height = capabilities.image_fit(640, 480)
    assert width > 0 and height > 0
