"""Drive the CLI from tests: in-process through CliRunner, or as the installed subprocess.

The environment given replaces every ``PIPELINE_*`` variable of the caller, so a developer's
own settings never leak into a test.
"""

from __future__ import annotations

import os
import subprocess as sp
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from pipeline_cli.cli import cli


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**base, **env}


class Cli:
    """Runs the CLI in-process (CliRunner) or as the installed ``pipeline`` subprocess."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, input: str | None = None) -> Result:
        env: dict[str, str | None] = {
            k: None for k in os.environ if k.startswith("PIPELINE_") and k not in self.env
        }
        env.update(self.env)
        return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)

    def subprocess(self, *args: str, timeout: float = 120, **kw: Any
                   ) -> sp.CompletedProcess[str]:
        exe = Path(sys.executable).with_name("pipeline")
        if "stdout" not in kw and "stderr" not in kw:  # else the caller's streams
            kw["capture_output"] = True
        return sp.run([str(exe), *args], env=_clean_env(self.env), text=True,
                      timeout=timeout, **kw)

    def cron_env(self, **extra: str) -> dict[str, str]:
        """The environment cron gives a job (PATH and SHELL only: no HOME, LANG or TERM) plus
        this runner's settings and ``extra``."""
        return {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", **self.env, **extra}

    def cron(self, *args: str, wrapper: tuple[str, ...] = (), timeout: float = 120, **kw: Any
             ) -> sp.CompletedProcess[str]:
        """The installed script as cron starts it: its environment, cwd /, stdin /dev/null;
        behind ``wrapper`` if given (``("sh", "-c", 'exec "$@" >&-', "sh")``)."""
        exe = Path(sys.executable).with_name("pipeline")
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        kw.setdefault("env", self.cron_env())
        return sp.run([*wrapper, str(exe), *args], text=True, timeout=timeout, cwd="/",
                      stdin=sp.DEVNULL, **kw)

    def cron_popen(self, *args: str, wrapper: tuple[str, ...] = (), **kw: Any
                   ) -> sp.Popen[str]:
        """:meth:`cron` in the background, behind ``wrapper`` if given (``("timeout", "5")``)."""
        exe = str(Path(sys.executable).with_name("pipeline"))
        return sp.Popen([*wrapper, exe, *args], env=kw.pop("env", self.cron_env()), text=True,
                        cwd="/", stdin=sp.DEVNULL, stdout=sp.PIPE, stderr=sp.PIPE, **kw)

    def popen(self, *args: str, **kw: Any) -> sp.Popen[str]:
        exe = Path(sys.executable).with_name("pipeline")
        return sp.Popen([str(exe), *args], env=_clean_env(self.env), text=True,
                                stdout=sp.PIPE, stderr=sp.PIPE, **kw)
