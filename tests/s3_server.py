"""A real S3-protocol server (moto in server mode) plus the Airflow connection that points at it.

Why server mode rather than ``mock_aws()``: the provider talks to S3 through Airflow's
``ObjectStoragePath`` -> s3fs -> aiobotocore, i.e. over real HTTP with real signing, multipart rules and
error codes. In-process patching of botocore does not cover aiobotocore reliably, and it would not
exercise what production does. Server mode gives every test the same wire behaviour as AWS.

Use from a test module (or, later, ``tests/conftest.py``)::

    from tests.s3_server import moto_s3_server, s3_bucket  # noqa: F401  (fixtures)

    def test_x(s3_bucket):
        path = ObjectStoragePath(f"s3://{MOTO_CONN_ID}@{s3_bucket}/prefix")

Caveats worth knowing:

* The server shares moto's in-process backends. A test that enters ``moto.mock_aws()`` in the same
  process resets all backends on exit, which would also wipe buckets created here.
* Airflow's ``ObjectStoragePath("s3://conn@bucket")`` resolves the connection *when the path is built*
  and caches the resulting filesystem per ``(protocol, conn_id)`` for the life of the process, even
  when the connection is missing (it then silently caches an anonymous client pointed at real AWS).
  The fixture therefore installs the connection first and drops that cache entry on start and stop.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

MOTO_CONN_ID = "moto_s3"
"""Airflow connection id served by the fixture; use it as ``s3://moto_s3@bucket/key``."""

FAKE_ACCESS_KEY = "testing-access-key"
FAKE_SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"

# Environment that keeps boto from consulting the developer's real AWS setup (profiles, SSO, the EC2
# metadata service, which costs a multi-second timeout when it is not there).
_ISOLATION_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


def _conn_env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def _forget_cached_filesystem(conn_id: str) -> None:
    """Drop Airflow's per-process filesystem cache for ``s3://conn_id@...`` (see module docstring)."""
    try:
        from airflow.sdk.io import store
    except ImportError:  # pragma: no cover - older Airflow layouts
        return
    for protocol in ("s3", "s3a", "s3n"):
        store._STORE_CACHE.pop(f"{protocol}-{conn_id}", None)
    try:
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover - s3fs is an optional extra
        pass


@dataclass
class MotoS3Server:
    """A running moto S3 server on 127.0.0.1 and the Airflow connection that reaches it."""

    conn_id: str = MOTO_CONN_ID
    host: str = "127.0.0.1"
    port: int = 0
    _server: Any = field(default=None, repr=False)
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> MotoS3Server:
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request at INFO; that drowns the output of the code under test.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self._install_env()
        _forget_cached_filesystem(self.conn_id)
        return self

    def stop(self) -> None:
        _forget_cached_filesystem(self.conn_id)
        self._restore_env()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def connection_json(self) -> str:
        """The connection as Airflow's JSON env-var format, usable by other processes too."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": FAKE_ACCESS_KEY,
                "password": FAKE_SECRET_KEY,
                "extra": {"endpoint_url": self.endpoint_url, "region_name": REGION},
            }
        )

    def env(self) -> dict[str, str]:
        """Everything a subprocess (e.g. an Airflow worker) needs to reach this server."""
        return {**_ISOLATION_ENV, _conn_env_var(self.conn_id): self.connection_json()}

    def client(self) -> Any:
        """A plain boto3 S3 client for arranging and inspecting state behind the code under test."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """All keys under ``prefix``, for asserting exactly what was (not) written."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

    def _install_env(self) -> None:
        updates: dict[str, str | None] = {**self.env(), **dict.fromkeys(_UNSET_ENV)}
        for key, value in updates.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()


@pytest.fixture(scope="session")
def moto_s3_server() -> Iterator[MotoS3Server]:
    """One server per test session: starting moto costs ~1 s, buckets give per-test isolation."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_s3_server: MotoS3Server) -> str:
    """A fresh, empty bucket on the moto server, so tests never see each other's objects."""
    return moto_s3_server.create_bucket()
