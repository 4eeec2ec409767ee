"""sync-odata: sync wall time / pure page-fetch wall time, and peak RSS of a large sync.

The OData fixture server runs as its own process on 127.0.0.1 serving a generated network
(lazily, so it holds no feed in memory). In one run, side by side against that server:
pure fetches (every page fetched and parsed, nothing else), a first sync (every row new),
changed syncs (two servers alternate between a feed and a copy with 1 % of its rows changed)
and unchanged syncs (``noop``). Each sync is paired with a pure fetch just before it; a ratio
is the best sync over the best fetch of five such pairs (the machine is shared, so single runs
swing both ways), and the detail gives the spread of the per-pair ratios.
Peak RSS is measured in a child process that does nothing but two syncs (a first one, then one
with 1 % of the rows changed): its own ``VmHWM`` (the high-water mark of its address space
after exec), so the servers and this process are not counted. Not ``ru_maxrss``: Linux carries
that over from the forked copy of this (large) benchmark process across exec, which once
reported this process's 980 MB as the sync's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pipeline_cli
from bench import scratch_database
from devtools.cleanup import drop_bucket
from devtools.odata_data import (
    NetworkShape,
    change_row,
    sample_network,
    write_feed,
)
from devtools.services import LocalServices
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.adapters.odata import ODataClient
from pipeline_cli.adapters.odata_format import resolve_mapping
from pipeline_cli.db import Database
from pipeline_cli.runner import StageRunner
from pipeline_cli.settings import ODataSettings
from pipeline_cli.stages.sync_odata import sync_odata

PAGE_SIZE = 1000


def peak_rss_kb() -> int:
    """This process's own peak RSS, VmHWM (``ru_maxrss`` would include that of the process
    it was forked from, which Linux carries over across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0  # pragma: no cover - not Linux


def stops_for_rows(rows: int) -> int:
    """Stops n give n + 2n routes + 3 flights per 25 routes = about 3.24 n rows."""
    n = max(2, int(rows / 3.24))
    while NetworkShape(n).n_stops + NetworkShape(n).n_routes + NetworkShape(n).n_flights < rows:
        n += 1
    return n


def total_rows(n_stops: int) -> int:
    s = NetworkShape(n_stops)
    return s.n_stops + s.n_routes + s.n_flights


@contextmanager
def odata_server(*source: str) -> Iterator[str]:
    """The fixture server in its own process; yields its service root URL.

    ``source`` is ``("--sample", N)`` (rows generated lazily) or ``("--data", FILE)``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-odata-") as tmp:
        port_file = Path(tmp) / "url"
        proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.odata_server", *source,
             "--page-size", str(PAGE_SIZE), "--port-file", str(port_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("OData fixture server did not start")
                time.sleep(0.05)
            yield port_file.read_text().strip()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def feeds(n_stops: int, workdir: Path) -> tuple[Path, Path, int]:
    """The sample network as a feed file, and a copy with 1 % of the rows changed."""
    data = sample_network(n_stops)
    original = workdir / "feed.json"
    write_feed(original, data)
    changed = 0
    for rows in data.values():
        for row in rows[::100]:
            change_row(row)
            changed += 1
    modified = workdir / "feed-changed.json"
    write_feed(modified, data)
    return original, modified, changed


def client(url: str) -> ODataClient:
    return ODataClient(ODataSettings(url=url, read_timeout=120, backoff_base=0.1, backoff_max=5))


def pure_fetch(url: str) -> tuple[float, int]:
    """Every page of every set, fetched and parsed exactly as sync does, and nothing else."""
    mappings = resolve_mapping(None)
    rows = 0
    started = time.perf_counter()
    with client(url) as c:
        for m in mappings.values():
            select = sorted({f for f in m.fields.values() if f})
            for page in c.pages(m.entity_set, orderby=m.key_field, select=select):
                rows += len(page.rows)
    return time.perf_counter() - started, rows


def one_sync(url: str, database_url: str, s3: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    store = BackupStore.connect(s3["endpoint"], s3["access_key"], s3["secret_key"],
                                s3["bucket"], secure=s3["secure"])
    started = time.perf_counter()
    with client(url) as c:
        record = StageRunner(Database(database_url)).run(
            "sync-odata", lambda ctx: sync_odata(Database(database_url), c, store, ctx))
    elapsed = time.perf_counter() - started
    if record.error:
        raise RuntimeError(f"sync failed: {record.error}")
    return elapsed, {"status": record.status, **record.extra, "counts": record.counts}


def empty_bucket(s3: dict[str, Any]) -> None:
    store = BackupStore.connect(s3["endpoint"], s3["access_key"], s3["secret_key"],
                                s3["bucket"], secure=s3["secure"])
    drop_bucket(store.client, s3["bucket"])


def _best(pairs: list[tuple[float, float]]) -> tuple[float, str]:
    """Best-of-N ratio of (sync, fetch) pairs measured alternately, and a detail text."""
    syncs, fetches = [p[0] for p in pairs], [p[1] for p in pairs]
    each = sorted(s / f for s, f in pairs)
    text = (f"best of {len(pairs)} alternating runs: sync {min(syncs):.2f} s, pure fetch "
            f"{min(fetches):.2f} s; per-pair ratios {each[0]:.2f}..{each[-1]:.2f}, median "
            f"{each[len(each) // 2]:.2f}")
    return min(syncs) / min(fetches), text


def ratios(services: LocalServices, rows: int, s3: dict[str, Any], rounds: int
           ) -> list[dict[str, Any]]:
    """Each sync is paired with a pure fetch of the same server just before it; with other
    work on the machine, the best of several alternating pairs is the stable figure."""
    n_stops = stops_for_rows(rows)
    with tempfile.TemporaryDirectory(prefix="bench-feeds-") as tmp, \
            scratch_database(services.postgres()) as database_url:
        original, modified, changed = feeds(n_stops, Path(tmp))
        with odata_server("--data", str(original)) as url_a, \
                odata_server("--data", str(modified)) as url_b:
            for url in (url_a, url_b):  # warm-up: imports, connections, the servers' caches
                pure_fetch(url)
            f1, fetched = pure_fetch(url_a)
            first, first_result = one_sync(url_a, database_url, s3)
            assert first_result["status"] == "success"
            updates: list[tuple[float, float]] = []
            updated: list[int] = []
            for i in range(rounds):  # a, b, a, ...: every sync changes 1 % of the rows
                url = url_b if i % 2 == 0 else url_a
                fetch, _ = pure_fetch(url)
                sync, result = one_sync(url, database_url, s3)
                assert result["status"] == "success", result
                updates.append((sync, fetch))
                updated.append(sum(result["updated"].values()))
            noops: list[tuple[float, float]] = []
            for _ in range(rounds):
                fetch, _ = pure_fetch(url)
                sync, result = one_sync(url, database_url, s3)
                assert result["status"] == "noop", result
                noops.append((sync, fetch))
    update_ratio, update_text = _best(updates)
    noop_ratio, noop_text = _best(noops)
    detail = f"{fetched:,} rows in pages of {PAGE_SIZE} from the fixture server (own process)"
    return [
        {"name": "sync-odata: changed feed (1 % of rows), sync / pure fetch",
         "value": round(update_ratio, 3), "goal": "<= 1.3", "unit": "ratio",
         "detail": f"{update_text}; {min(updated):,}..{max(updated):,} of {changed:,} "
                   f"changed rows updated per sync, backed up to S3; {detail}"},
        {"name": "sync-odata: unchanged feed, sync / pure fetch",
         "value": round(noop_ratio, 3), "goal": "<= 1.1", "unit": "ratio",
         "detail": f"{noop_text}; {detail}"},
        {"name": "sync-odata: first load (every row new), sync / pure fetch",
         "value": round(first / f1, 3), "goal": "(reference)", "unit": "ratio",
         "detail": f"one sync {first:.2f} s into an empty read model; pure fetch "
                   f"{f1:.2f} s just before"},
    ]


def peak_rss(services: LocalServices, rows: int, s3: dict[str, Any]) -> dict[str, Any]:
    """A first sync, then one of the same feed with 1 % of its rows changed, in one child
    process."""
    n_stops = stops_for_rows(rows)
    with odata_server("--sample", str(n_stops)) as url, \
            odata_server("--sample", str(n_stops), "--changed-every", "100") as changed, \
            scratch_database(services.postgres()) as database_url:
        args = json.dumps({"urls": [url, changed], "database_url": database_url, "s3": s3})
        proc = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True,
                              text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"child sync failed: {proc.stderr[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": f"sync-odata: peak RSS of a {total_rows(n_stops) / 1e6:.2g} M-row sync",
            "value": round(child["hwm_kb"] / 1024, 1), "goal": "< 300", "unit": "MB",
            "detail": f"VmHWM of the sync's process; a first sync ({child['rows']:,} rows, "
                      f"{child['seconds'][0]:.1f} s) and one with 1 % of the rows changed "
                      f"({child['seconds'][1]:.1f} s), one after the other in one process"}


def module_lines() -> dict[str, Any]:
    """Lines of the package's modules whose path names sync or odata (the CLI command too)."""
    package = Path(pipeline_cli.__file__).parent
    paths = {str(p.relative_to(package)): p for p in sorted(package.rglob("*.py"))}
    lines = {name: len(p.read_text(encoding="utf-8").splitlines())
             for name, p in paths.items() if "sync" in name or "odata" in name}
    return {"name": "sync-odata: lines of the modules whose path names sync or odata",
            "value": sum(lines.values()), "goal": "<= 1400", "unit": "lines",
            "detail": ", ".join(f"{path} {n}" for path, n in lines.items())}


def run(quick: bool = False) -> list[dict[str, Any]]:
    services = LocalServices()
    try:
        endpoint = services.s3()
        s3 = {"endpoint": endpoint.endpoint, "access_key": endpoint.access_key,
              "secret_key": endpoint.secret_key, "secure": endpoint.secure,
              "bucket": f"bench-{uuid.uuid4().hex[:10]}"}
        try:
            results = ratios(services, 30_000 if quick else 200_000, s3,
                             rounds=2 if quick else 5)
            # The RSS run syncs into a database of its own, which numbers its versions from
            # ds-v1 again (a number another database's backup holds would be skipped).
            empty_bucket(s3)
            results.append(peak_rss(services, 100_000 if quick else 1_000_000, s3))
            results.append(module_lines())
        finally:
            empty_bucket(s3)
    finally:
        services.stop_all()
    return results


def _child(args: dict[str, Any]) -> None:
    seconds = []
    for url in args["urls"]:
        elapsed, result = one_sync(url, args["database_url"], args["s3"])
        assert result["status"] == "success", result
        seconds.append(elapsed)
    rows = sum(v for k, v in result["counts"].items() if k != "rejected")
    print(json.dumps({"hwm_kb": peak_rss_kb(), "seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        for item in run(quick="--quick" in sys.argv):
            print(json.dumps(item), flush=True)
