"""`make demo`: start local services and a sample OData feed, then run the whole pipeline.

``up`` starts (or reuses) PostgreSQL, Redis, SeaweedFS S3, osrm-routed on the Helsinki extract
and the OData fixture server serving a sample network, all on 127.0.0.1, and writes
``.local/demo.env``. ``run`` migrates, ingests sample GPS traces (driven on the Helsinki roads,
made once and kept in ``.local/demo/``), runs ``pipeline run-all`` and prints
``pipeline status``; a second ``run`` shows every stage as ``noop``. ``down`` drops the demo
database, Redis prefix and S3 bucket, then stops everything ``up`` started. All state lives in
the git-ignored ``.local/``.

The database, prefix and bucket are named after the state dir (``pipeline_demo_<hash>``), so
two clones on one machine sharing PostgreSQL, Redis and S3 each have their own demo, and one
clone's ``down`` never drops the other's.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psycopg
from psycopg import sql

from devtools.cleanup import drop_bucket, drop_prefix
from devtools.services import LocalServices, S3Endpoint, ServiceError, default_state_dir
from devtools.services import stop_recorded as stop_services

DEMO_TRACES = 4


@dataclass(frozen=True)
class DemoNames:
    """What one checkout's demo creates on the shared servers."""

    database: str
    redis_prefix: str
    bucket: str


def demo_names(state: Path) -> DemoNames:
    """Names unique to the state dir (one per checkout unless ``PIPELINE_LOCAL_DIR`` says so)."""
    tag = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:10]
    return DemoNames(f"pipeline_demo_{tag}", f"pipeline-demo-{tag}", f"pipeline-demo-{tag}")


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
    path = prepare(state, admin, redis_url, s3, osrm, _odata_up(state))
    click.echo(f"demo services are up; environment in {path}", err=True)


def prepare(state: Path, admin: str, redis_url: str, s3: S3Endpoint, osrm: str,
            odata: str) -> Path:
    """Create this checkout's demo database and write ``demo.env`` naming it; returns the file."""
    names = demo_names(state)
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (names.database,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names.database)))
    env = {
        "PIPELINE_DATABASE_URL": psycopg.conninfo.make_conninfo(admin, dbname=names.database),
        "PIPELINE_REDIS_URL": redis_url,
        "PIPELINE_REDIS_PREFIX": names.redis_prefix,
        "PIPELINE_S3_ENDPOINT": s3.endpoint,
        "PIPELINE_S3_ACCESS_KEY": s3.access_key,
        "PIPELINE_S3_SECRET_KEY": s3.secret_key,
        "PIPELINE_S3_SECURE": "true" if s3.secure else "false",
        "PIPELINE_S3_BUCKET": names.bucket,
        "PIPELINE_OSRM_URL": osrm,
        "PIPELINE_ODATA_URL": odata,
    }
    path = state / "demo.env"
    # Quoted, so `set -a; . .local/demo.env` works in a shell too (a conninfo has spaces).
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    path.chmod(0o600)
    return path


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


def _clean(env: dict[str, str], names: DemoNames) -> None:
    """Drop what this checkout's demo wrote: its database, Redis keys and S3 bucket, on the
    servers ``env`` names."""
    import redis
    from minio import Minio

    url = env.get("PIPELINE_DATABASE_URL")
    if url:
        try:
            with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname="postgres"),
                                 autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(names.database)))
            click.echo(f"dropped database {names.database}", err=True)
        except psycopg.Error as exc:
            click.echo(f"could not drop database {names.database}: {exc}", err=True)
    if env.get("PIPELINE_REDIS_URL"):
        client = redis.Redis.from_url(env["PIPELINE_REDIS_URL"], socket_timeout=5)
        try:
            removed = drop_prefix(client, names.redis_prefix)
            click.echo(f"removed {removed} Redis keys under {names.redis_prefix}:", err=True)
        except redis.RedisError as exc:
            click.echo(f"could not clean Redis: {exc}", err=True)
        finally:
            client.close()
    if env.get("PIPELINE_S3_ENDPOINT"):
        s3 = Minio(env["PIPELINE_S3_ENDPOINT"], access_key=env.get("PIPELINE_S3_ACCESS_KEY"),
                   secret_key=env.get("PIPELINE_S3_SECRET_KEY"),
                   secure=env.get("PIPELINE_S3_SECURE") == "true")
        try:
            if drop_bucket(s3, names.bucket):
                click.echo(f"removed S3 bucket {names.bucket}", err=True)
        except Exception as exc:  # S3 already stopped or unreachable: nothing left to clean
            click.echo(f"could not clean S3: {type(exc).__name__}: {exc}", err=True)


@cli.command(help="Drop the demo database, Redis keys and bucket; stop what the demo started.")
def down() -> None:
    state = _state()
    if _env_file().exists():
        _clean(_read_env(_env_file()), demo_names(state))
    _odata_down(state)
    for record in stop_services():
        click.echo(f"stopped {record.id} (pid {record.pid})", err=True)
    _env_file().unlink(missing_ok=True)


if __name__ == "__main__":
    cli()
