"""docker-compose.yml without a container engine: valid against the Compose Specification's JSON schema
(vendored, no network), and everything it names exists: services, volumes, files, env vars, the views
the Grafana dashboard queries (run for real against a migrated Postgres schema)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator
from sqlalchemy import text

import tests.airflow_support  # noqa: F401  (isolated AIRFLOW_HOME before anything imports airflow)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "fixtures" / "compose-spec.json"
INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:?\-][^}]*)?\}")
IMAGE_ENV = ("POSTGRES_", "GF_")  # read by the postgres and grafana images themselves


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    files = service.get("env_file") or []
    for f in [files] if isinstance(files, str | dict) else files:
        path = f if isinstance(f, str) else f["path"]
        if (ROOT / path).exists():
            for line in (ROOT / path).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    env.setdefault(k.strip(), v.strip())
    return {k: str(v) for k, v in env.items()}


def test_compose_file_matches_the_compose_specification(compose):
    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    errors = sorted(Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_compose_file(compose):
    """The vendored schema is the real one: it catches a typo'd key and a bad depends_on condition."""
    v = Draft7Validator(json.loads(SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["healthchek"] = broken["services"]["redis"].pop("healthcheck")
    broken["services"]["grafana"]["depends_on"]["postgres"]["condition"] = "service_ready"
    messages = [e.message for e in v.iter_errors(broken)]
    assert any("healthchek" in m for m in messages) and len(messages) >= 2


def test_stack_has_the_production_services(compose):
    services = compose["services"]
    assert {
        "postgres",
        "redis",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-gpu",
        "grafana",
    } <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    for name, svc in services.items():
        if name.startswith("airflow-"):
            assert _env_of(svc)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
            assert _env_of(svc)["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/"), name

    cpu, gpu = services["airflow-worker"], services["airflow-worker-gpu"]
    assert cpu["command"][:5] == ["airflow", "celery", "worker", "--queues", "default"]
    assert gpu["command"][:5] == ["airflow", "celery", "worker", "--queues", "gpu"]
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("${FINSENT_CUDA_VARIANT:-cu")
    assert cpu["image"] != gpu["image"], "the CPU and CUDA builds must not overwrite each other's tag"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "deploy" not in cpu


def test_every_reference_in_compose_exists(compose):
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    used_volumes = set()
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        build = svc.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
            dockerfile = (context / build.get("dockerfile", "Dockerfile")).read_text()
            for arg in build.get("args") or {}:
                assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), (
                    f"{name}: build arg {arg} not declared in the Dockerfile"
                )
        for f in svc.get("env_file") or []:
            path, required = (f, True) if isinstance(f, str) else (f["path"], f.get("required", True))
            assert not required or (ROOT / path).is_file(), f"{name}: env_file {path} missing"
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} missing"
            else:
                used_volumes.add(source)
    assert used_volumes == declared_volumes, f"named volumes used {used_volumes} vs declared {declared_volumes}"


def test_dockerfile_copies_and_scripts_exist():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    assert copies
    for line in copies:
        for src in line.split():
            assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in dockerfile
    pinned = re.search(r'"torch==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in dockerfile, "the image's torch must match the pinned one"
    init = (ROOT / "docker" / "airflow-init.sh").read_text()
    assert "airflow db migrate" in init and "finsent db upgrade" in init


def test_every_env_var_is_real(compose):
    """Each variable the stack sets is read by something, and each ${VAR} is documented in docker/env.example."""
    from airflow.configuration import conf
    from airflow.providers_manager import ProvidersManager

    from pipeline import orchestrate

    ProvidersManager().initialize_providers_configuration()  # the [celery] options come from the provider
    known = {(sec, key) for sec, body in conf.configuration_description.items() for key in body.get("options", {})}

    example = (ROOT / "docker" / "env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    interpolated = set(INTERP.findall(COMPOSE.read_text()))
    assert interpolated and interpolated <= documented, f"undocumented: {sorted(interpolated - documented)}"

    readers = "\n".join(
        p.read_text(errors="replace").lower()
        for pattern in ("pipeline/**/*.py", "docker/*.sh", "docker/postgres/*.sh", "grafana/provisioning/**/*.yaml")
        for p in ROOT.glob(pattern)
    )
    conn_ids = {orchestrate.DB_CONN_ID, orchestrate.SLACK_CONN_ID, orchestrate.SMTP_CONN_ID}
    for name, svc in compose["services"].items():
        for var in _env_of(svc):
            if var.startswith("AIRFLOW__"):
                section, key = var[len("AIRFLOW__") :].lower().split("__", 1)
                assert (section, key) in known, f"{name}: {var} is not an Airflow setting"
            elif var.startswith("AIRFLOW_CONN_"):
                assert var[len("AIRFLOW_CONN_") :].lower() in conn_ids, f"{name}: unknown connection {var}"
            elif var.startswith("AIRFLOW_VAR_"):
                assert var[len("AIRFLOW_VAR_") :].lower() == orchestrate.CONFIG_VARIABLE, (
                    f"{name}: unknown Variable {var}"
                )
            elif not var.startswith(IMAGE_ENV):
                assert var.lower() in readers, f"{name}: nothing reads {var}"


def test_gpu_pool_and_queue_match_the_dag():
    from airflow.dag_processing.dagbag import DagBag

    score = DagBag(str(ROOT / "dags")).dags["finsent_monitor"].get_task("score")
    init = (ROOT / "docker" / "airflow-init.sh").read_text()
    assert f"airflow pools set {score.pool} " in init
    assert f'--queues", "{score.queue}"' in COMPOSE.read_text()


def test_grafana_provisioning_is_wired(compose):
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/finsent.yaml").read_text())["datasources"][0]
    assert ds["type"] == "grafana-postgresql-datasource" and ds["url"].startswith("postgres:")
    assert ds["jsonData"]["database"] == "finsent"
    assert "GRAFANA_DB_PASSWORD" in _env_of(compose["services"]["grafana"])
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/finsent.yaml").read_text())["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./")}
    assert provider["options"]["path"] in mounts
    assert any((ROOT / mounts[provider["options"]["path"]]).glob("*.json"))
    dash = json.loads((ROOT / "grafana/dashboards/finsent.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]} | {
        t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]
    }
    assert uids == {ds["uid"]}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_grafana_queries_run_against_the_migrated_views(engine):
    """Every dashboard query, with Grafana's macros expanded, runs on a freshly migrated schema."""
    from pipeline.dashboard_bench import expand_macros, grafana_queries

    queries = grafana_queries()
    end = datetime.now(UTC)
    assert len(queries) >= 8
    with engine.connect() as c:
        views = set(c.execute(text("SELECT viewname FROM pg_views WHERE schemaname = current_schema()")).scalars())
        views |= set(
            c.execute(text("SELECT matviewname FROM pg_matviews WHERE schemaname = current_schema()")).scalars()
        )
        for title, sql in queries:
            used = set(re.findall(r"\bFROM\s+([a-z_]+)", sql))
            assert used and used <= views, f"{title}: queries {used - views}, not a view created by sql/views"
            c.execute(text(expand_macros(sql, end - timedelta(days=7), end, ["NWB"]))).all()
