"""One real SGLang cluster (two `sglang serve` workers on the tiny checkpoint, `sglang-router` in front)
per test session, shared by the `sglang` tests: a worker starts in 30-40 s on 2 CPU cores.

`make test-sglang` runs these (after `make install-sglang`) with ZIMAGE_SGLANG_REQUIRED=1, where a
missing engine is a failure; anywhere else a missing `.venv-sglang` skips them with the reason.
A test that kills a worker leaves it dead; the `sglang` fixture starts it again before the next test
(one to two minutes on 2 busy cores), so the killing test is the last one (`-p no:randomly`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_zimage.testing.sglang_cluster import SGLangCluster, sglang_venv


@pytest.fixture(scope="session")
def sglang_session_cluster(
    tiny_zimage_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SGLangCluster]:
    try:
        sglang_venv()
        cluster = SGLangCluster(tiny_zimage_model, tmp_path_factory.mktemp("sglang"), workers=2)
    except FileNotFoundError as exc:  # no .venv-sglang, or no nginx
        if os.environ.get("ZIMAGE_SGLANG_REQUIRED") == "1":
            raise
        pytest.skip(str(exc))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sglang(sglang_session_cluster: SGLangCluster) -> SGLangCluster:
    """The session's cluster with every worker up (a killed one is started again on its port)."""
    sglang_session_cluster.restart_dead_workers()
    return sglang_session_cluster
