"""sync-odata's row worker: a second process that turns spooled raw pages into canonical rows.

The sync's own process fetches the pages (a thread reads ahead) and only spools them raw. This
process parses, checks, hashes and indexes them (:class:`~.rows.SetProcessor`) on the
other core, so the fetch never waits for the GIL. One JSON line per message on stdin; one reply
line on stdout at the end (or an error as soon as one happens). The pages stay in the raw spool
files of the sync's work folder; only their offsets cross the pipe.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, NoReturn

from .. import errors
from ..adapters.odata_format import EntityMapping
from .rows import (
    ENTITIES,
    REFERENCES,
    Problems,
    SetFiles,
    SetOutput,
    SetProcessor,
    load_index,
)

# ------------------------------------------------------------------------------ worker side


class _Worker:
    def __init__(self, start: dict[str, Any]) -> None:
        self.workdir = Path(start["workdir"])
        self.protocol: str = start["protocol"]
        self.mappings = {e: EntityMapping(e, m["set"], m["fields"], m["filter"])
                         for e, m in start["mappings"].items()}
        self.indexed: bool = start["indexed"]
        reject_path = start.get("rejects")
        self.rejects: IO[str] | None = (open(reject_path, "w", encoding="utf-8")  # noqa: SIM115
                                        if reject_path else None)
        self.problems = Problems(reject_file=self.rejects)
        self.indexes: dict[str, dict[str, int]] = {}
        self.current: SetProcessor | None = None
        self.outputs: dict[str, SetOutput] = {}

    def begin(self, entity: str) -> None:
        self.end()
        expected = ENTITIES[len(self.outputs)]
        if entity != expected:
            raise RuntimeError(f"sets out of order: {entity} before {expected}")
        files = SetFiles.of(self.workdir, entity)
        index = None
        if self.indexed:
            index = load_index(files.old_keys.read_bytes(), files.old_digests.read_bytes())
            self.indexes[entity] = index
        self.current = SetProcessor(self.mappings[entity], files, self.protocol, self.problems,
                                    index, self.indexes)

    def end(self) -> None:
        if self.current is not None:
            out = self.current.close()
            self.outputs[out.entity] = out
            self.current = None
            # an index is kept only while a later set may still reference its keys
            needed = {parent for child, _, parent in REFERENCES
                      if child not in self.outputs}
            for entity in list(self.indexes):
                if entity not in needed:
                    del self.indexes[entity]

    def finish(self) -> dict[str, Any]:
        self.end()
        if self.rejects is not None:
            self.rejects.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"sets": {e: vars(o) for e, o in self.outputs.items()},
                "problems": self.problems.to_json(),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_kb": peak_rss_kb()}


def peak_rss_kb() -> int:
    """This process's own peak RSS, VmHWM (``ru_maxrss`` would include that of the process
    it was forked from, which Linux carries over across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0  # pragma: no cover - not Linux


def main() -> int:
    # Ctrl-C reaches the whole process group: the sync's own process handles it and ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer

    def reply(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc).encode() + b"\n")
        out.flush()

    worker: _Worker | None = None
    try:
        for line in sys.stdin.buffer:
            msg = json.loads(line)
            op = msg["op"]
            if op == "page":
                assert worker is not None and worker.current is not None
                worker.current.page(msg["offset"], msg["length"], msg["number"])
            elif op == "set":
                assert worker is not None
                worker.begin(msg["set"])
            elif op == "start":
                worker = _Worker(msg)
            elif op == "finish":
                assert worker is not None
                reply({"ok": worker.finish()})
                return 0
        return 0  # end of input without "finish": the sync gave up or died; nothing to say
    except errors.PipelineError as exc:
        reply({"error": {"type": type(exc).__name__, "message": exc.message}})
    except Exception as exc:  # reported to the sync, which fails the run with it
        reply({"error": {"type": "", "message": f"{type(exc).__name__}: {exc}"}})
    return 1


# ------------------------------------------------------------------------------ sync side


class RowWorker:
    """The sync's handle on its row worker process. Close it in a ``finally``."""

    def __init__(self, workdir: Path) -> None:
        """Spawn the worker; it imports its modules while the sync prepares :meth:`start`."""
        self.workdir = workdir
        self.log_path = workdir / "row-worker.log"
        with self.log_path.open("wb") as log:
            # -P: the current directory is not put on sys.path (nothing there can shadow us)
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", __name__], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, close_fds=True)
        self.started = time.monotonic()

    def start(self, *, protocol: str, mappings: dict[str, EntityMapping], indexed: bool,
              rejects: Path | None) -> None:
        """``indexed``: the active version's row index is in the sets' ``old_*`` files."""
        self.send({"op": "start", "workdir": str(self.workdir), "protocol": protocol,
                   "mappings": {e: m.to_json() for e, m in mappings.items()},
                   "indexed": indexed, "rejects": str(rejects) if rejects else None})

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._failed()

    def page(self, entity: str, offset: int, length: int, number: int) -> None:
        self.send({"op": "page", "set": entity, "offset": offset, "length": length,
                   "number": number})

    def finish(self) -> tuple[dict[str, SetOutput], dict[str, Any], dict[str, Any]]:
        """Wait for the worker: (outputs per set, its problems, its own figures)."""
        self.send({"op": "finish"})
        doc = self._reply()
        self.proc.wait()
        sets = {e: SetOutput(**o) for e, o in doc["sets"].items()}
        stats = {"cpu_s": doc["cpu_s"], "peak_rss_kb": doc["peak_rss_kb"],
                 "wall_s": round(time.monotonic() - self.started, 3)}
        return sets, doc["problems"], stats

    def close(self) -> None:
        """End the worker if it is still running (a failed or interrupted sync)."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a dead worker's pipe: nothing to flush to
                    pipe.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._failed()
        doc: dict[str, Any] = json.loads(line)
        _raise_reported(doc)
        ok: dict[str, Any] = doc["ok"]
        return ok

    def _failed(self) -> NoReturn:
        """The worker stopped early: raise the error it reported, or the last line it printed."""
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            line = self.proc.stdout.readline()
            if line:
                _raise_reported(json.loads(line))
        self.proc.wait()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()
        raise errors.PipelineError(
            f"sync-odata row worker exited with code {self.proc.returncode}"
            + (f": {tail[-1]}" if tail else ""))


def _raise_reported(doc: dict[str, Any]) -> None:
    """Raise the worker's reported error as the same class, if the reply is one."""
    if "error" not in doc:
        return
    err = doc["error"]
    cls = getattr(errors, err["type"], None) if err["type"] else None
    if isinstance(cls, type) and issubclass(cls, errors.PipelineError):
        raise cls(err["message"])
    raise errors.PipelineError(f"sync-odata row worker failed: {err['message']}")


if __name__ == "__main__":
    sys.exit(main())
