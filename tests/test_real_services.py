"""The production stack's stores, for real: PostgreSQL laid out by docker/postgres/init-databases.sh
and an `mlflow server` on it with proxied artifacts, driven by plain MlflowClient calls."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from contextlib import closing

import psycopg2
import pytest
from mlflow import MlflowClient

from tests.services import MlflowServer, StackDatabases


def _connect(databases: StackDatabases, user: str, password: str, database: str):
    return psycopg2.connect(
        host="127.0.0.1",
        port=databases.server.port,
        user=user,
        password=password,
        dbname=database,
        connect_timeout=5,
    )


def test_init_script_gives_each_store_its_own_password_protected_database(stack_databases):
    with closing(_connect(stack_databases, "mlflow", stack_databases.mlflow_password, "mlflow")) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user, pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'")
            assert cursor.fetchone() == ("mlflow", "mlflow")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        _connect(stack_databases, "mlflow", "wrong-password", "mlflow")
    # CONNECT is revoked from PUBLIC: a leaked Prefect password does not open the registry.
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        _connect(stack_databases, "prefect", stack_databases.prefect_password, "mlflow")


def test_run_artifact_and_registered_alias_round_trip_through_the_server(mlflow_server: MlflowServer, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri, registry_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"real-services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really weights \x00\x01\x02")
    client.log_artifact(run.info.run_id, str(weights), artifact_path="model")
    client.set_terminated(run.info.run_id)

    # Proxied: the client sees only mlflow-artifacts:/ and the bytes land in the server's store.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    # Other tests share this session's server: look only under this run's own folder.
    stored = [p for p in mlflow_server.artifacts_dir.rglob("model.safetensors") if run.info.run_id in p.parts]
    assert [path.read_bytes() for path in stored] == [weights.read_bytes()]
    downloaded = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "dl"))
    assert open(downloaded, "rb").read() == weights.read_bytes()

    name = f"layermoe-real-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.version, champion.run_id) == (version.version, run.info.run_id)


def test_server_refuses_host_names_outside_allowed_hosts(mlflow_server: MlflowServer):
    url = f"{mlflow_server.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    rebound = urllib.request.Request(url, headers={"Host": "attacker.example:5000"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code in (400, 403)
