"""The S3 backup store against the real S3 server (SeaweedFS) of the test session."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devtools.services import S3Endpoint
from pipeline_cli.adapters.backups import BackupStore

pytestmark = pytest.mark.s3


def test_concurrent_first_uploads_create_the_bucket_once(s3: S3Endpoint, s3_bucket: str,
                                                         tmp_path: Path) -> None:
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    files = []
    for i in range(8):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * (i + 1))
        files.append(path)
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(lambda p: store.put_file(f"t/{p.name}", str(p)), files))
    assert sorted(store.list("t/")) == sorted(f"t/{p.name}" for p in files)
