"""Launcher for servers that must outlive the `services up` CLI that starts them.

Reads a JSON spec on stdin, starts the command in a new session with its output appended to
the log, prints the pid and exits at once, so the server is adopted by init, not by the CLI.
Run by file path (not imported), so it depends on nothing but the standard library.
"""

import json
import os
import pwd
import subprocess
import sys
from typing import Any


def main() -> None:
    spec = json.load(sys.stdin)
    extra: dict[str, Any] = {}
    if spec["user"]:
        entry = pwd.getpwnam(spec["user"])
        extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with open(spec["log"], "ab") as log:
        proc = subprocess.Popen(
            spec["cmd"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=spec["env"],
            cwd=spec["cwd"] or None,
            **extra,
        )
    sys.stdout.write(f"{proc.pid}\n")
    sys.stdout.flush()
    # os._exit skips Popen's finaliser: the child is meant to keep running without us.
    os._exit(0)


if __name__ == "__main__":
    main()
