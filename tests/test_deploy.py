"""The deployment kit, checked statically (Docker and Kubernetes cannot run here): every file a
Dockerfile or compose file names exists, ports agree everywhere, probes hit real routes, nginx's
limits match the app's defaults, and `nginx -t` accepts the config when nginx is installed."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

from glmvision.core.config import Settings
from glmvision.ops.metrics import Metrics
from glmvision.web.openapi import ROUTES

DEPLOY = ROOT / "deploy"
ROUTE_PATHS = {route.path for route in ROUTES}
BIND_PORT = 8080


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s."""
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def containers() -> Iterator[dict[str, Any]]:
    for deployment in objects("Deployment").values():
        yield from deployment["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


# --- Dockerfile --------------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_every_path_the_dockerfile_copies_exists() -> None:
    copies = [shlex.split(line)[1:] for line in dockerfile() if line.startswith("COPY ")]
    local = [args for args in copies if not any(arg.startswith("--from") for arg in args)]
    assert len(local) >= 5
    for args in local:
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_runs_as_a_user_binds_the_port_and_checks_readiness() -> None:
    lines = dockerfile()
    assert sum(line.startswith("FROM ") for line in lines) >= 2  # multi-stage
    assert all("cuda" in line for line in lines if line.startswith("FROM "))
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert f"GLMVISION_BIND=0.0.0.0:{BIND_PORT}" in env
    assert f"EXPOSE {BIND_PORT}" in lines
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert f"127.0.0.1:{BIND_PORT}/readyz" in health and "/readyz" in ROUTE_PATHS
    assert "--start-period=" in health
    assert any(line.startswith("VOLUME") and "/models" in line for line in lines)
    assert not any("huggingface" in line.lower() or "snapshot_download" in line for line in lines)


# --- docker compose ---------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_parses_and_its_services_reference_real_files() -> None:
    services = compose()["services"]
    assert set(services) == {"glmvision", "redis", "prometheus", "grafana"}
    build = services["glmvision"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("${"):
                continue  # the operator's weights directory
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    secret = compose()["secrets"]["glmvision_api_keys"]["file"]
    assert (DEPLOY / secret).relative_to(ROOT).as_posix() in (ROOT / ".gitignore").read_text()


def test_compose_reserves_a_gpu_and_points_glmvision_at_its_redis() -> None:
    glmvision = compose()["services"]["glmvision"]
    (device,) = glmvision["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    env = glmvision["environment"]
    for name in ("GLMVISION_RATELIMIT_STORAGE_URI", "GLMVISION_CACHE_URI", "GLMVISION_BREAKER_STORAGE_URI"):
        assert env[name].startswith("redis://redis:6379/"), name
    assert env["GLMVISION_MODEL"].startswith("/models/")
    assert any(port.endswith(f":{BIND_PORT}:{BIND_PORT}") for port in glmvision["ports"])


def test_prometheus_scrapes_the_service_port_and_grafana_gets_the_dashboard() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in ROUTE_PATHS
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose()["services"] and int(port) == BIND_PORT
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/glmvision.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert any(m.startswith("./grafana/glmvision.json:" + folder + "/") for m in mounts)


# --- Kubernetes -------------------------------------------------------------------------------------


def test_probes_hit_real_routes_on_the_containers_port() -> None:
    (container,) = [c for c in containers() if c["name"] == "glmvision"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == port_of(env_of(container)["GLMVISION_BIND"]) == BIND_PORT
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["httpGet"]["path"] in ROUTE_PATHS, kind
        assert probe["httpGet"]["port"] in ports, kind
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # minutes to load weights
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_services_selectors_and_names_agree_across_manifests() -> None:
    deployments, services = objects("Deployment"), objects("Service")
    for service in services.values():
        wanted = service["spec"]["selector"].items()
        selected = [
            d for d in deployments.values() if wanted <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        named = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named
    (container,) = [c for c in containers() if c["name"] == "glmvision"]
    for name, value in env_of(container).items():
        if value.startswith("redis://"):
            assert value.split("//")[1].split(":")[0] in services, name
    volumes = deployments["glmvision"]["spec"]["template"]["spec"]["volumes"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    secrets = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert claims <= set(objects("PersistentVolumeClaim")) and claims
    assert secrets <= set(objects("Secret")) and secrets
    keys_file = env_of(container)["GLMVISION_API_KEYS_FILE"]
    (secret,) = objects("Secret").values()
    assert Path(keys_file).name in secret["stringData"]


def test_autoscaler_and_budget_target_the_deployment_on_a_real_metric() -> None:
    (hpa,) = objects("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in objects("Deployment")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in set(Metrics().names())
    adapter = yaml.safe_load(objects("ConfigMap")["prometheus-adapter-glmvision"]["data"]["config.yaml"])
    assert any(rule["name"]["as"] == name for rule in adapter["rules"])
    (pdb,) = objects("PodDisruptionBudget").values()
    labels = objects("Deployment")["glmvision"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- nginx and systemd ------------------------------------------------------------------------------


def nginx_conf() -> str:
    return (DEPLOY / "nginx.conf").read_text()


def directive(name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", nginx_conf(), re.M)


def test_nginx_limits_match_the_app() -> None:
    default_mb = Settings.model_fields["max_body_mb"].default
    assert directive("client_max_body_size") == [f"{int(default_mb)}m"]
    assert directive("proxy_buffering") == ["off"]  # streams go through as they are written
    assert directive("proxy_set_header X-Forwarded-For") == ["$remote_addr"]  # one hop, replaced
    assert directive("client_header_timeout") and directive("client_body_timeout")  # slow clients
    block = re.search(r"upstream glmvision \{([^}]*)\}", nginx_conf())
    assert block and re.findall(r"^\s*server\s+([^;\s]+);", block.group(1), re.M) == [
        f"127.0.0.1:{BIND_PORT}"
    ]
    read_timeout = int(directive("proxy_read_timeout")[0].rstrip("s"))
    assert read_timeout > Settings.model_fields["request_timeout"].default


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (.ci/run installs it)")
def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    conf = nginx_conf().replace("/etc/ssl/glmvision", str(tmp_path))
    conf = conf.replace("/tmp/glmvision-nginx.pid", str(tmp_path / "nginx.pid"))
    (tmp_path / "nginx.conf").write_text(conf)
    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "error_log stderr;"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_the_systemd_unit_restarts_reads_its_environment_and_is_hardened() -> None:
    unit = {}
    for line in (DEPLOY / "glmvision.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            unit[key.strip()] = value.strip()
    assert unit["Restart"] == "on-failure"
    assert unit["EnvironmentFile"] == "/etc/glmvision/glmvision.env"
    assert "deploy/gunicorn.conf.py" in unit["ExecStart"] and "wsgi:app" in unit["ExecStart"]
    assert unit["NoNewPrivileges"] == "true" and unit["ProtectSystem"] == "strict"
    assert unit["ProtectHome"] == "true" and unit["PrivateTmp"] == "true"
    assert int(unit["TimeoutStartSec"]) >= 600
    example = (DEPLOY / "glmvision.env.example").read_text()
    names = re.findall(r"^#?\s*(GLMVISION_\w+)=", example, re.M)
    fields = {"GLMVISION_" + field.upper() for field in Settings.model_fields} | {
        "GLMVISION_BIND", "GLMVISION_WORKERS", "GLMVISION_THREADS", "GLMVISION_TIMEOUT",
    }  # fmt: skip
    assert names and set(names) <= fields


# --- shared memory for the engine process ----------------------------------------------------------


def _bytes(size: str) -> int:
    """A compose or Kubernetes size ("2gb", "2Gi") in bytes."""
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", size).groups()  # type: ignore[union-attr]
    scale = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    return int(number) * scale[unit.lower()]


def test_containers_give_the_engine_process_room_in_dev_shm() -> None:
    """Workers hand image tensors to the engine through /dev/shm: a container's 64 MiB is too little."""
    at_least = 1 << 30  # several 2048 px images' float32 pixels at once
    assert _bytes(compose()["services"]["glmvision"]["shm_size"]) >= at_least
    for deployment in objects("Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        if not any(c["name"] == "glmvision" for c in spec["containers"]):
            continue
        (container,) = [c for c in spec["containers"] if c["name"] == "glmvision"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        assert _bytes(volume["emptyDir"]["sizeLimit"]) >= at_least
