"""`make demo`: start local services and a sample OData feed, then run the whole pipeline.

``up`` starts (or reuses) PostgreSQL, Redis, SeaweedFS S3, osrm-routed on the Helsinki extract
and the OData fixture server serving a sample network, all on 127.0.0.1, and writes
``.local/demo.env``. ``run`` migrates, ingests sample GPS traces (driven on the Helsinki roads,
made once and kept in ``.local/demo/``), runs ``pipeline run-all`` and prints
``pipeline status``; a second ``run`` shows every stage as ``noop``. ``down`` drops the demo
database, Redis prefix and S3 bucket, then stops everything ``up`` started. All state lives in
the git-ignored ``.local/``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import psycopg
from psycopg import sql

from devtools.cleanup import drop_bucket, drop_prefix
from devtools.services import LocalServices, ServiceError, default_state_dir
from devtools.services import stop_recorded as stop_services

DEMO_DB = "pipeline_demo"
DEMO_PREFIX = "pipeline-demo"
DEMO_BUCKET = "pipeline-demo"
DEMO_TRACES = 4


def _state() -> Path:
    return default_state_dir()


def _env_file() -> Path:
    return _state() / "demo.env"


def _read_env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = " ".join(shlex.split(value))
    return out


def _odata_up(state: Path) -> str:
    """Start the sample OData feed unless the one recorded is still answering."""
    url_file, pid_file = state / "odata.url", state / "odata.pid"
    if pid_file.exists() and url_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            return url_file.read_text().strip()
        except (OSError, ValueError):
            pass
    url_file.unlink(missing_ok=True)
    log = (state / "logs" / "odata.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.odata_server", "--sample", "400",
         "--port", "0", "--page-size", "500", "--port-file", str(url_file)],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )
    pid_file.write_text(str(proc.pid))
    for _ in range(200):
        if url_file.exists() and url_file.read_text().strip():
            return url_file.read_text().strip()
        if proc.poll() is not None:
            raise click.ClickException("the sample OData server did not start")
        time.sleep(0.05)
    raise click.ClickException("the sample OData server did not start in time")


def _odata_down(state: Path) -> None:
    pid_file = state / "odata.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            click.echo("stopped the sample OData server", err=True)
        except (OSError, ValueError):
            pass
        pid_file.unlink(missing_ok=True)
    (state / "odata.url").unlink(missing_ok=True)


@click.group(help="Run the pipeline on local demo services.")
def cli() -> None:
    pass


@cli.command(help="Start or reuse the demo services and write .local/demo.env.")
def up() -> None:
    state = _state()
    state.mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    services = LocalServices(detached=True)
    try:
        admin = services.postgres()
        redis_url = services.redis()
        s3 = services.s3()
        osrm = services.osrm()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DB,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DB)))
    env = {
        "PIPELINE_DATABASE_URL": psycopg.conninfo.make_conninfo(admin, dbname=DEMO_DB),
        "PIPELINE_REDIS_URL": redis_url,
        "PIPELINE_REDIS_PREFIX": DEMO_PREFIX,
        "PIPELINE_S3_ENDPOINT": s3.endpoint,
        "PIPELINE_S3_ACCESS_KEY": s3.access_key,
        "PIPELINE_S3_SECRET_KEY": s3.secret_key,
        "PIPELINE_S3_SECURE": "true" if s3.secure else "false",
        "PIPELINE_S3_BUCKET": DEMO_BUCKET,
        "PIPELINE_OSRM_URL": osrm,
        "PIPELINE_ODATA_URL": _odata_up(state),
    }
    path = _env_file()
    # Quoted, so `set -a; . .local/demo.env` works in a shell too (a conninfo has spaces).
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    path.chmod(0o600)
    click.echo(f"demo services are up; environment in {path}", err=True)


def _pipeline(env: dict[str, str], *args: str) -> int:
    exe = Path(sys.executable).with_name("pipeline")
    click.echo(f"$ pipeline {' '.join(args)}", err=True)
    return subprocess.run([str(exe), *args], env={**os.environ, **env}).returncode


def _traces_file(env: dict[str, str]) -> Path:
    """Sample GPS traces as CSV: a few buses driving real Helsinki routes (made once, through
    the demo's OSRM /route, then reused so a rerun ingests nothing new)."""
    path = _state() / "demo" / "traces.csv"
    if path.exists():
        return path
    from devtools.traces import make_traces
    from pipeline_cli.adapters.osrm import OsrmClient

    path.parent.mkdir(parents=True, exist_ok=True)
    with OsrmClient(env["PIPELINE_OSRM_URL"]) as client:
        made = make_traces(client, DEMO_TRACES, seed=7, min_points=60)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("device_id,recorded_at,latitude,longitude\n")
        for i, trace in enumerate(made):
            for device, at, lat, lon in trace.rows(f"demo-bus-{i + 1}"):
                fh.write(f"{device},{at.isoformat()},{lat:.7f},{lon:.7f}\n")
    tmp.replace(path)
    return path


@cli.command(help="Migrate, ingest sample GPS traces, run `pipeline run-all`, print status.")
def run() -> None:
    if not _env_file().exists():
        raise click.ClickException("no .local/demo.env: run `make demo` (it runs `up` first)")
    env = _read_env(_env_file())
    traces = _traces_file(env)
    for step in (("db", "migrate"), ("ingest-gps", str(traces)), ("run-all",)):
        code = _pipeline(env, *step)
        if code:
            raise SystemExit(code)
    raise SystemExit(_pipeline(env, "status"))


def _clean(env: dict[str, str]) -> None:
    """Drop what the demo wrote: its database, Redis keys and S3 bucket."""
    import redis
    from minio import Minio

    url = env.get("PIPELINE_DATABASE_URL")
    if url:
        try:
            with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname="postgres"),
                                 autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(DEMO_DB)))
            click.echo(f"dropped database {DEMO_DB}", err=True)
        except psycopg.Error as exc:
            click.echo(f"could not drop database {DEMO_DB}: {exc}", err=True)
    if env.get("PIPELINE_REDIS_URL"):
        client = redis.Redis.from_url(env["PIPELINE_REDIS_URL"], socket_timeout=5)
        try:
            removed = drop_prefix(client, DEMO_PREFIX)
            click.echo(f"removed {removed} Redis keys under {DEMO_PREFIX}:", err=True)
        except redis.RedisError as exc:
            click.echo(f"could not clean Redis: {exc}", err=True)
        finally:
            client.close()
    if env.get("PIPELINE_S3_ENDPOINT"):
        s3 = Minio(env["PIPELINE_S3_ENDPOINT"], access_key=env.get("PIPELINE_S3_ACCESS_KEY"),
                   secret_key=env.get("PIPELINE_S3_SECRET_KEY"),
                   secure=env.get("PIPELINE_S3_SECURE") == "true")
        try:
            if drop_bucket(s3, DEMO_BUCKET):
                click.echo(f"removed S3 bucket {DEMO_BUCKET}", err=True)
        except Exception as exc:  # S3 already stopped or unreachable: nothing left to clean
            click.echo(f"could not clean S3: {type(exc).__name__}: {exc}", err=True)


@cli.command(help="Drop the demo database, Redis keys and bucket; stop what the demo started.")
def down() -> None:
    state = _state()
    if _env_file().exists():
        _clean(_read_env(_env_file()))
    _odata_down(state)
    for record in stop_services():
        click.echo(f"stopped {record.id} (pid {record.pid})", err=True)
    _env_file().unlink(missing_ok=True)


if __name__ == "__main__":
    cli()
