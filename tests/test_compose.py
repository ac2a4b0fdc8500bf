"""docker-compose.yml against the Compose Specification schema and the stack's requirements.

No Docker engine runs here, so the file is checked statically: by check-jsonschema with the
compose-spec schema it vendors (builtin `vendor.compose-spec`), and structurally below.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# ${NAME}, ${NAME:-default}, ${NAME:?error}; `$$` is an escaped literal dollar, not a variable.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(:?[-?][^}]*)?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
FROM_ENV = r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}"  # a required variable: compose refuses to start without it


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def validate_against_compose_spec(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def service_environment(service: dict) -> dict[str, str]:
    return {name: str(value) for name, value in service.get("environment", {}).items()}


def test_compose_file_is_valid_under_the_compose_specification():
    result = validate_against_compose_spec(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_validation_rejects_a_misspelt_depends_on_condition(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_healty", 1))
    result = validate_against_compose_spec(broken)
    assert result.returncode != 0
    assert "service_healty" in result.stdout + result.stderr


def test_stack_runs_every_service_of_the_design(compose):
    assert set(compose["services"]) == {
        "postgres",
        "redis",
        "prefect-server",
        "prefect-services",
        "prefect-setup",
        "s3",
        "create-bucket",
        "mlflow",
        "worker",
        "gpu-worker",
    }


def test_startup_waits_for_healthy_dependencies_and_the_finished_bucket_job(compose):
    services = compose["services"]
    waits = {
        (name, dependency): spec["condition"]
        for name, service in services.items()
        for dependency, spec in service.get("depends_on", {}).items()
    }
    assert waits == {
        ("prefect-server", "postgres"): "service_healthy",
        ("prefect-server", "redis"): "service_healthy",
        ("prefect-services", "prefect-server"): "service_healthy",
        ("prefect-services", "redis"): "service_healthy",
        ("prefect-setup", "prefect-server"): "service_healthy",
        ("create-bucket", "s3"): "service_healthy",
        ("mlflow", "postgres"): "service_healthy",
        ("mlflow", "create-bucket"): "service_completed_successfully",
        ("worker", "prefect-server"): "service_healthy",
        ("worker", "mlflow"): "service_healthy",
        ("gpu-worker", "prefect-server"): "service_healthy",
        ("gpu-worker", "mlflow"): "service_healthy",
    }
    for (_, dependency), condition in waits.items():
        if condition == "service_healthy":
            assert services[dependency]["healthcheck"]["test"], dependency
    assert services["create-bucket"]["restart"] == "no"  # a one-shot job must not be restarted


def test_postgres_creates_both_databases_with_the_init_script(compose):
    postgres = compose["services"]["postgres"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in postgres["volumes"]}
    assert mounts["./docker/postgres/init-databases.sh"].startswith("/docker-entrypoint-initdb.d/")
    assert (ROOT / "docker" / "postgres" / "init-databases.sh").is_file()
    assert "-d mlflow" in postgres["healthcheck"]["test"][1]  # healthy only after the script ran


def test_prefect_api_and_services_run_split_on_postgres_with_asyncpg(compose):
    server, services = compose["services"]["prefect-server"], compose["services"]["prefect-services"]
    assert server["command"] == ["prefect", "server", "start", "--no-services"]
    assert services["command"] == ["prefect", "server", "services", "start"]
    pinned_prefect = re.search(r'"prefect==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for container in (server, services):
        assert container["image"] == f"prefecthq/prefect:{pinned_prefect}-python3.11"
        environment = service_environment(container)
        assert environment["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
        assert environment["PREFECT_MESSAGING_BROKER"] == "prefect_redis.messaging"


def test_mlflow_serves_artifacts_from_s3_on_postgres_with_allowed_hosts(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)
    assert any(arg.startswith("--allowed-hosts=") for arg in command)
    environment = service_environment(mlflow)
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert environment["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    pinned_mlflow = re.search(r'"mlflow==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"mlflow=={pinned_mlflow}"' in (ROOT / "docker" / "mlflow" / "Dockerfile").read_text()
    assert mlflow["build"] == compose["services"]["create-bucket"]["build"] == "./docker/mlflow"


def test_workers_only_talk_to_the_servers_and_hold_no_s3_credentials(compose):
    for name in ("worker", "gpu-worker"):
        environment = service_environment(compose["services"][name])
        assert environment == {
            "PREFECT_API_URL": "http://prefect-server:4200/api",
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "LAYERMOE_WORKDIR": "/data/work",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        }


def test_workers_read_inputs_read_only_and_have_a_grace_period_for_a_step_and_a_checkpoint(compose):
    grace = {}
    for name in ("worker", "gpu-worker"):
        service = compose["services"][name]
        assert "${LAYERMOE_INPUTS:-./inputs}:/inputs:ro" in service["volumes"]
        grace[name] = service["stop_grace_period"]
    assert grace == {"worker": "2m", "gpu-worker": "10m"}  # sized in docs/operations.md, "Workers"


def test_prefect_setup_runs_the_server_setup_script_the_tests_run(compose):
    setup = compose["services"]["prefect-setup"]
    assert setup["command"] == ["python", "/opt/layermoe/setup_server.py"]
    assert "./docker/prefect/setup_server.py:/opt/layermoe/setup_server.py:ro" in setup["volumes"]
    assert setup["restart"] == "no"


def test_gpu_worker_runs_only_under_the_gpu_profile_with_an_nvidia_reservation(compose):
    worker, gpu_worker = compose["services"]["worker"], compose["services"]["gpu-worker"]
    assert "profiles" not in worker
    assert gpu_worker["profiles"] == ["gpu"]
    devices = gpu_worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(device["driver"], device["capabilities"]) for device in devices] == [("nvidia", ["gpu"])]
    assert worker["build"]["context"] == gpu_worker["build"]["context"] == "."
    pools = {
        name: service["command"][service["command"].index("--pool") + 1]
        for name, service in (("worker", worker), ("gpu-worker", gpu_worker))
    }
    assert pools["worker"] != pools["gpu-worker"]  # GPU flow runs go to GPU machines only


def test_worker_image_installs_the_makefiles_pinned_torch_before_the_package():
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert dockerfile[[line.startswith("FROM") for line in dockerfile].index(True)] == "FROM python:3.11-slim"
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f'ARG TORCH_SPEC="{torch_spec}"' in dockerfile
    torch_install = next(i for i, line in enumerate(dockerfile) if "pip install ${TORCH_SPEC}" in line)
    package_install = next(i for i, line in enumerate(dockerfile) if "pip install ." in line)
    assert torch_install < package_install


def test_compose_file_holds_no_literal_secrets(compose):
    for name, service in compose["services"].items():
        for variable, value in service_environment(service).items():
            if SECRET_NAME.search(variable):
                assert re.fullmatch(FROM_ENV, value), f"{name}.{variable} is not from .env"
            for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert re.fullmatch(FROM_ENV, password), f"{name}.{variable} embeds a password"


def test_env_example_documents_every_variable_and_env_is_ignored_by_git(compose):
    used = {match.group(1) for match in VARIABLE.finditer(COMPOSE_FILE.read_text())}
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and not line.startswith("#"))
    assert used == set(example)
    required = {match.group(1) for match in VARIABLE.finditer(COMPOSE_FILE.read_text()) if (match.group(2) or "").startswith(":?")}
    assert {name: example[name] for name in required} == dict.fromkeys(required, "")  # no shipped secret
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def run_seaweedfs_entrypoint(tmp_path: Path, access_key: str, secret_key: str) -> subprocess.CompletedProcess:
    """docker/seaweedfs/entrypoint.sh with a stand-in for the image's entrypoint that echoes its arguments."""
    image_entrypoint = tmp_path / "image-entrypoint.sh"
    image_entrypoint.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    image_entrypoint.chmod(0o755)
    environment = {
        "PATH": "/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "S3_ACCESS_KEY": access_key,
        "S3_SECRET_KEY": secret_key,
        "SEAWEEDFS_IMAGE_ENTRYPOINT": str(image_entrypoint),
    }
    return subprocess.run(
        ["sh", str(ROOT / "docker" / "seaweedfs" / "entrypoint.sh")], env=environment, capture_output=True, text=True, check=False
    )


def test_seaweedfs_entrypoint_makes_the_env_key_pair_the_only_s3_identity(tmp_path):
    result = run_seaweedfs_entrypoint(tmp_path, "AKIA0example", "s3cr3t/with+base64=")
    assert result.returncode == 0, result.stderr
    config = tmp_path / "s3-identities.json"
    assert result.stdout.split() == ["server", "-ip.bind=0.0.0.0", "-s3", "-s3.port=8333", f"-s3.config={config}"]
    identities = json.loads(config.read_text())["identities"]
    assert [identity["credentials"] for identity in identities] == [[{"accessKey": "AKIA0example", "secretKey": "s3cr3t/with+base64="}]]
    assert config.stat().st_mode & 0o077 == 0  # no one but its owner reads the secret


def test_seaweedfs_entrypoint_refuses_a_key_that_would_break_its_json(tmp_path):
    result = run_seaweedfs_entrypoint(tmp_path, "AKIA0example", 'x", "accessKey": "evil')
    assert result.returncode == 64
    assert "openssl rand -hex 24" in result.stderr
    assert not (tmp_path / "s3-identities.json").exists()
