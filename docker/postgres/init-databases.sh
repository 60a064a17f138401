#!/usr/bin/env bash
# First start of the Postgres container: one database and role for Airflow's metadata, one for finsent,
# and a read-only role for Grafana on the finsent views.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE ROLE airflow LOGIN PASSWORD '${AIRFLOW_DB_PASSWORD}';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE finsent LOGIN PASSWORD '${FINSENT_DB_PASSWORD}';
CREATE DATABASE finsent OWNER finsent;
CREATE ROLE grafana_ro LOGIN PASSWORD '${GRAFANA_DB_PASSWORD}';
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname finsent <<SQL
GRANT CONNECT ON DATABASE finsent TO grafana_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE finsent IN SCHEMA public GRANT SELECT ON TABLES TO grafana_ro;
GRANT USAGE ON SCHEMA public TO grafana_ro;
SQL
