"""The wheel users install holds the product only: no test harness, no dev tools, no demo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what lives in devtools/ and tests/support/ and must never be installed
HARNESS = {"testing", "tests", "devtools", "bench", "odata_server", "odata_data", "services",
           "procs", "_detach", "osrm_assets", "demo", "clirunner", "proxy", "reliability",
           "graph_fixtures", "traces", "cleanup"}


def test_the_wheel_holds_the_product_only(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"pipeline_cli"}
    harness = [n for n in names if HARNESS & {Path(part).stem for part in n.split("/")}]
    assert harness == []
    assert "pipeline_cli/cli.py" in names
    assert any(n.startswith("pipeline_cli/sql/") and n.endswith(".sql") for n in names)
