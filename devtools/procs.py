"""Process plumbing for the local-service harness: free ports, file locks, spawning servers.

Every server the harness starts goes through :func:`spawn` (own session, output to a log file)
and is recorded in ``<state>/services.json`` by :class:`Registry`, so ``down`` can stop it later.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local service could not be found, started or prepared; the message says which."""


# --------------------------------------------------------------------------- small helpers


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now, all distinct (sockets are held until all are chosen)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def free_port_pairs(count: int, offset: int = 10000) -> list[int]:
    """Ports ``p`` where ``p`` and ``p + offset`` are both free (SeaweedFS's gRPC convention)."""
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(count * 200):
            if len(chosen) == count:
                return chosen
            port = rng.randrange(15000, 32000)  # + offset stays clear of 65535
            if port in chosen or port + offset in chosen:
                continue
            pair = []
            for candidate in (port, port + offset):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.bind((LOOPBACK, candidate))
                except OSError:
                    sock.close()
                    break
                pair.append(sock)
            held.extend(pair)
            if len(pair) == 2:
                chosen.append(port)
        raise ServiceError(f"could not find {count} free port pairs on {LOOPBACK}")
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock shared by every process using the same state dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_private(path: Path, text: str) -> None:
    """Atomically write a file readable by its owner only (it may hold secrets)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def remove_paths(paths: Iterable[str | Path]) -> None:
    """Remove folders and files (sockets included) left by a stopped server."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- process identity


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks: tells a recorded process from a reused pid."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int, started: int | None = None) -> bool:
    fields = _proc_stat(pid)
    if fields is None:
        if not Path("/proc").is_dir():  # no procfs: the best we can do is a signal probe
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


# --------------------------------------------------------------------------- records


@dataclass
class ProcessRecord:
    """One server started by the harness, as written to ``services.json``."""

    id: str  # unique within the state dir, e.g. "redis-40123"
    kind: str  # "postgres" | "redis" | "s3" | "osrm"
    pid: int
    started: int | None  # kernel start time, see start_time()
    cmd: list[str]  # never holds secrets: those go through the environment
    log: str
    url: str
    detached: bool  # started by `up`: meant to outlive the process that started it
    owner_pid: int
    stop_signal: int = int(signal.SIGTERM)
    cleanup: list[str] = field(default_factory=list)  # paths removed once it has stopped
    params: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return is_alive(self.pid, self.started)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


class Registry:
    """``services.json``: what the harness has started from this state dir, guarded by a lock."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "services.json"
        self.lock_path = state_dir / "locks" / "services.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with file_lock(self.lock_path):
            yield

    def load(self) -> list[ProcessRecord]:
        """Records as on disk. Call inside :meth:`locked` when about to write them back."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as exc:
            raise ServiceError(f"{self.path} is not valid JSON ({exc}); delete it") from exc
        return [ProcessRecord.from_json(item) for item in data.get("processes", [])]

    def save(self, records: Sequence[ProcessRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".services.json.{os.getpid()}.tmp")
        payload = {"processes": [asdict(r) for r in records]}
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, record: ProcessRecord) -> None:
        with self.locked():
            records = [r for r in self.load() if r.id != record.id]
            records.append(record)
            self.save(records)

    def remove(self, ids: set[str]) -> None:
        with self.locked():
            self.save([r for r in self.load() if r.id not in ids])

    def live(self, kind: str) -> list[ProcessRecord]:
        return [r for r in self.load() if r.kind == kind and r.alive()]


# --------------------------------------------------------------------------- spawning


@dataclass
class Spawned:
    """A started server: its record, and its Popen when it is our own child."""

    record: ProcessRecord
    popen: subprocess.Popen[bytes] | None


def spawn(
    cmd: Sequence[str],
    *,
    log: Path,
    kind: str,
    ident: str,
    url: str,
    detached: bool,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
    cleanup: Sequence[Path] = (),
    params: dict[str, Any] | None = None,
) -> Spawned:
    """Start ``cmd`` in its own session with stdout+stderr appended to ``log``.

    A detached server is launched through a short-lived helper process, so it is not our
    child: no Popen outlives this call and the server keeps running when we exit.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    popen: subprocess.Popen[bytes] | None = None
    if detached:
        spec = {"cmd": list(cmd), "log": str(log), "env": full_env, "cwd": str(cwd or ""),
                "user": user or ""}
        # The spec (with any secret in env) goes through stdin, never through argv.
        launcher = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("_detach.py"))],
            input=json.dumps(spec).encode(),
            capture_output=True,
            check=False,
            timeout=30,
        )
        if launcher.returncode != 0:
            raise ServiceError(
                f"could not start {cmd[0]}: {launcher.stderr.decode(errors='replace').strip()}"
            )
        pid = int(launcher.stdout.decode().strip())
    else:
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=full_env,
                cwd=cwd,
                **user_kwargs(user),
            )
        pid = popen.pid
    record = ProcessRecord(
        id=ident,
        kind=kind,
        pid=pid,
        started=start_time(pid),
        cmd=list(cmd),
        log=str(log),
        url=url,
        detached=detached,
        owner_pid=os.getpid(),
        stop_signal=int(stop_signal),
        cleanup=[str(p) for p in cleanup],
        params=dict(params or {}),
    )
    return Spawned(record, popen)


def user_kwargs(user: str | None) -> dict[str, Any]:
    """Popen arguments that run the child as ``user`` with that user's groups only."""
    if not user:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def signal_stop(record: ProcessRecord) -> None:
    """First step of a stop: the polite signal, to the server itself only."""
    if record.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, record.stop_signal)


def wait_stopped(
    record: ProcessRecord, popen: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """Wait for a signalled server; SIGKILL its whole process group after ``timeout``."""
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.05)
        else:
            time.sleep(0.05)
    if record.alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
    if popen is not None:
        popen.wait(timeout=10)
    else:
        deadline = time.monotonic() + 10
        while record.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
