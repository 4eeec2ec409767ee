"""Fixtures of the reliability suite: an isolated :class:`Sandbox` world per test, all of them
run with real secrets, and a suite-wide check that no secret ever shows in any output.

Every sandbox database is owned by a login role with a random password (per session) and the
CLI connects as it over TCP with the password in ``PIPELINE_DATABASE_URL``; S3 keys are the
S3 server's real ones. After each test, the stdout and stderr of every ``pipeline`` process
the harness ran are scanned for all of those values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtools.services import LocalServices
from tests.support import reliability
from tests.support.reliability import Sandbox, password_role, small_network

SandboxFactory = Callable[..., Sandbox]


@pytest.fixture(scope="session")
def secret_role(pg_admin_url: str) -> Iterator[tuple[str, str, str]]:
    """(role, password, template): a password role owning a migrated template database."""
    with password_role(pg_admin_url) as role:
        yield role


@pytest.fixture
def make_sandbox(services: LocalServices, pg_admin_url: str,
                 secret_role: tuple[str, str, str]) -> Iterator[SandboxFactory]:
    """Build sandboxes (cloned from the role's template); all are removed after the test."""
    made: list[Sandbox] = []
    role, password, template = secret_role

    def make(**kw: Any) -> Sandbox:
        kw.setdefault("odata_rows", small_network())
        sb = Sandbox(services, template=template, admin_url=pg_admin_url, role=role,
                     role_password=password, **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()


@pytest.fixture
def sandbox(make_sandbox: SandboxFactory) -> Sandbox:
    return make_sandbox()


@pytest.fixture(autouse=True)
def no_secret_in_any_output(services: LocalServices, secret_role: tuple[str, str, str]
                            ) -> Iterator[list[str]]:
    """Fails the test if a known secret appears in the output of any process it ran.

    Tests may append more secret values to the yielded list."""
    reliability.OBSERVED.clear()
    extra: list[str] = []
    yield extra
    secrets = [secret_role[1], services.s3().secret_key, *extra]
    leaks: list[str] = []
    for res in list(reliability.OBSERVED):
        where = f"`pipeline {' '.join(res.args)}`"
        leaks += reliability.find_secrets(res.stdout, secrets, f"stdout of {where}")
        leaks += reliability.find_secrets(res.stderr, secrets, f"stderr of {where}")
    reliability.OBSERVED.clear()
    assert leaks == [], leaks
