#!/usr/bin/env bash
# Creates the two databases of the stack, each owned by its own login role, so that a leaked
# Prefect password cannot read the model registry and vice versa.
#
# The postgres image runs this once, on the first start of an empty data volume
# (/docker-entrypoint-initdb.d). tests/test_real_services.py runs it against a real
# PostgreSQL with the same environment, so the layout the tests use is the layout deployed.
#
# Environment: POSTGRES_USER and POSTGRES_DB (the superuser session, set by the image),
# PREFECT_DB_PASSWORD and MLFLOW_DB_PASSWORD (from .env). Connection settings such as
# PGHOST/PGPORT are honoured by psql.
set -euo pipefail

: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD (see .env.example)}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (see .env.example)}"

# Passwords travel as psql variables and are quoted by psql (:'name'), never spliced into SQL.
psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
