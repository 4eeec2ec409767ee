"""kill -9 at random moments of every stage: the database, Redis and S3 stay consistent, the
run shows as ``crashed``, and the next run succeeds.

Each run is a real ``pipeline`` process forked from a pre-imported server (so a trial costs
milliseconds of start-up instead of seconds); the kill moment is drawn (seeded) from the span
after the run's "started" log line, i.e. after the lock is taken and while the stage works.
The larger runs (50 trials per stage) are in ``make bench`` (bench/bench_reliability.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline_cli.testing.reliability import ForkServer, Sandbox, kill_trials

TRIALS = 20
SandboxFactory = Callable[..., Sandbox]

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("forkserver")) as fs:
        yield fs


def run_trials(sb: Sandbox, server: ForkServer, stage: str, trials: int, seed: int) -> None:
    report = kill_trials(sb, server, stage, trials, seed=seed)
    assert report.problems == [], "\n".join(report.problems[:20])
    assert report.trials == trials and report.recovered == trials
    # Most kills must land while the stage works, or the test proves little.
    assert report.killed >= trials // 2, report


@pytest.mark.parametrize("stage", ["sync-odata", "gen-virtual", "build-graph"])
def test_kill_9_singleton_stage(make_sandbox: SandboxFactory, server: ForkServer,
                                stage: str) -> None:
    run_trials(make_sandbox(), server, stage, TRIALS, seed=hash(stage) % 1000)


@pytest.mark.osrm
@pytest.mark.parametrize("stage", ["match-gps", "run-all"])
def test_kill_9_with_gps(make_sandbox: SandboxFactory, server: ForkServer, osrm_url: str,
                         stage: str) -> None:
    sb = make_sandbox(osrm_url=osrm_url)
    sb.env["PIPELINE_MATCH_LEASE_SECONDS"] = "1"
    run_trials(sb, server, stage, TRIALS, seed=7)


@pytest.mark.slow
@pytest.mark.osrm
@pytest.mark.parametrize("stage", ["sync-odata", "gen-virtual", "build-graph", "match-gps",
                                   "run-all"])
def test_kill_9_fifty_trials(make_sandbox: SandboxFactory, server: ForkServer, osrm_url: str,
                             stage: str, tmp_path: Path) -> None:
    sb = make_sandbox(osrm_url=osrm_url)
    sb.env["PIPELINE_MATCH_LEASE_SECONDS"] = "1"
    run_trials(sb, server, stage, 50, seed=50)


# The kill -9 lands between build-graph's Redis pointer switch and its COMMIT: found by the
# 50-trial run-all benchmark (1 trial in 50). Made deterministic here by a process that
# SIGKILLs itself right after the switch returns (our own code, no server is mocked).
_DIE_AFTER_SWITCH = """
import os, signal, sys
from pipeline_cli.adapters import graph_store
switch = graph_store.GraphStore.switch_active
def switch_then_die(self, *args, **kwargs):
    out = switch(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return out
graph_store.GraphStore.switch_active = switch_then_die
sys.argv = ["pipeline", "build-graph", "--force"]
from pipeline_cli.cli import main
main()
"""


@pytest.mark.xfail(strict=True, reason=(
    "build-graph switches the Redis pointer (Lua CAS) before COMMITting the graph_versions row "
    "and active flag; a SIGKILL between the two leaves Redis serving a complete version that "
    "graph_versions does not know (PostgreSQL still names the previous one active) until the "
    "next build-graph run replaces it. Readers never see a half graph, but Redis and the "
    "database disagree on what is served."))
def test_kill_between_pointer_switch_and_commit(make_sandbox: SandboxFactory,
                                                server: ForkServer) -> None:
    import subprocess
    import sys

    from pipeline_cli.testing.reliability import check_graph, clean_env

    sb = make_sandbox()
    for step in ("sync-odata", "gen-virtual", "build-graph"):
        assert server.run([step], sb.env).exit_code == 0
    died = subprocess.run([sys.executable, "-c", _DIE_AFTER_SWITCH], env=clean_env(sb.env),
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == -9, died.stderr
    assert server.run(["build-graph", "--force"], sb.env).exit_code == 0
    assert sb.check() == []  # the next run repairs it (this part holds today) ...
    # ... but right after the kill the two stores disagree: rerun the scenario and look.
    died = subprocess.run([sys.executable, "-c", _DIE_AFTER_SWITCH], env=clean_env(sb.env),
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == -9, died.stderr
    assert check_graph(sb.connect(), sb.redis(), sb.prefix, sb.backups()) == []
