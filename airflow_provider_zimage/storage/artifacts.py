"""Where generated images and their manifest land, written so that a reader never sees half a file.

Every image costs money, so the store is what lets a retried or re-run task find out what it already
paid for: the operator writes the images, then ``manifest.json`` *last*. A manifest on storage
therefore implies that every image it names was fully written, and :func:`verify` re-checks each one by
sha256 before the operator trusts it instead of generating again.

Nothing incomplete is ever visible under a final name: the writes themselves (per kind of storage) and
the JSON encoding are `storage_atomic`'s, re-exported here for the modules that already import them
from `storage`.

Image bytes are never logged; log lines carry URIs, sizes and digests only.

The API is synchronous. Async code (triggers, the webhook app) must call it through
``asyncio.to_thread``: Airflow's S3 filesystem factory runs ``asyncio.run()`` the first time a
connection is used and raises ``RuntimeError`` inside a running event loop.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage import config
from airflow_provider_zimage.compat import storage_location
from airflow_provider_zimage.exceptions import ZImageStorageError
from airflow_provider_zimage.storage.atomic import (
    as_path,
    dumps_json,
    dumps_json_lines,
    local_path_of,
    read_bytes,
    read_json,
    write_bytes_atomic,
    write_chunks_atomic,
    write_json_atomic,
    write_local_atomic,
)
from airflow_provider_zimage.storage.spend import record_manifest

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_FORMATS",
    "ArtifactStore",
    "ImageArtifact",
    "ZImageStorageError",
    "as_path",
    "default_output_path",
    "inspect_image",
    "dumps_json",
    "dumps_json_lines",
    "normalize_format",
    "read_bytes",
    "read_json",
    "safe_segment",
    "verify",
    "write_bytes_atomic",
    "write_chunks_atomic",
    "write_json_atomic",
]

MANIFEST_NAME = "manifest.json"
DEFAULT_DIR_NAME = "zimage-artifacts"
UNMAPPED_SEGMENT = "unmapped"
"""Path segment used for ``map_index == -1``: a bare ``-1`` directory reads like a CLI flag in a shell."""

SUPPORTED_FORMATS: tuple[str, ...] = ("jpg", "png", "webp")

_PIL_FORMAT_TO_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FORMAT_ALIASES = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}

# Object stores whose fsspec `copy` of one object is a copy inside the service (S3 CopyObject, GCS
# rewrite, Azure copy blob): the bytes never travel through the worker, and the new key appears whole.
_SERVER_COPY_PROTOCOLS = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss"})

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=-]")
_MAX_SEGMENT_LEN = 200
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


# --------------------------------------------------------------------------------------------------
# Paths


def _airflow_home() -> str:
    """Same resolution as Airflow's own (env var, else ``~/airflow``), evaluated per call.

    Read at call time rather than import time so tests and workers that set ``AIRFLOW_HOME`` late are
    honoured, and without importing Airflow core's configuration module into task processes.
    """
    return os.path.expanduser(os.path.expandvars(os.environ.get("AIRFLOW_HOME") or "~/airflow"))


def default_output_path() -> ObjectStoragePath:
    """``[zimage] output_path`` if configured, else ``file://{AIRFLOW_HOME}/zimage-artifacts``.

    The fallback is created on the spot so a first run on a laptop works with zero configuration; on
    a multi-worker deployment it is a per-machine directory, which is why production should configure
    shared object storage.
    """
    configured = config.output_path()
    if configured:
        return as_path(configured)
    local = os.path.join(_airflow_home(), DEFAULT_DIR_NAME)
    os.makedirs(local, exist_ok=True)
    return as_path(local)


def safe_segment(value: str) -> str:
    """Make one path segment safe for local paths and object keys while keeping it readable.

    Characters outside ``[A-Za-z0-9._=-]`` become ``_`` and a leading ``.`` becomes ``_`` (no hidden
    or ``..`` segments). Whenever anything had to change, or the value is longer than 200 characters,
    ``-`` plus the first 8 hex digits of the original value's sha256 is appended. Why the suffix:
    Airflow allows run ids that differ only in characters we replace (``a:b`` and ``a+b``), and two
    runs sharing a directory would make the second one "find" the first one's images and never
    generate its own. Values that are already safe (all dag and task ids Airflow accepts in ASCII) are
    returned unchanged, so e.g. ``manual__2026-01-01T00:00:00+00:00`` becomes
    ``manual__2026-01-01T00_00_00_00_00-<8 hex>``.
    """
    if not value:
        raise ValueError("path segment must not be empty")
    cleaned = _UNSAFE_CHARS.sub("_", value)
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if cleaned == value and len(cleaned) <= _MAX_SEGMENT_LEN:
        return cleaned
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[: _MAX_SEGMENT_LEN - 9]}-{digest}"


def _map_index_segment(map_index: int | None) -> str:
    if map_index is None or map_index == -1:
        return UNMAPPED_SEGMENT
    if map_index < 0:
        raise ValueError(f"map_index must be -1 (unmapped) or >= 0, got {map_index}")
    return str(int(map_index))


# --------------------------------------------------------------------------------------------------
# Images


def normalize_format(fmt: str) -> str:
    """Map every spelling callers use (Runware's ``outputFormat`` ``JPG``, PIL's ``JPEG``) to one name.

    One canonical name per format so that manifests, file extensions and comparisons agree.
    """
    try:
        return _FORMAT_ALIASES[fmt.strip().lower()]
    except KeyError:
        raise ZImageStorageError(
            f"unsupported image format {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}"
        ) from None


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """Fully decode ``data`` and return ``(format, width, height)``.

    A full decode (``load()``), not just a header sniff, because a truncated download has a perfectly
    valid header; storing it would mean paying for an image nobody can open.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ZImageStorageError("image data is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            pil_format = img.format or ""
            width, height = img.size
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # Pillow's messages describe the failure, never the payload; the payload is not logged.
        raise ZImageStorageError(f"image data ({len(data)} bytes) could not be decoded: {exc}") from None
    fmt = _PIL_FORMAT_TO_EXT.get(pil_format)
    if fmt is None:
        raise ZImageStorageError(
            f"image format {pil_format or 'unknown'} is not supported; supported: "
            f"{', '.join(SUPPORTED_FORMATS)}"
        )
    return fmt, width, height


def check_image(
    payload: bytes, name: str, expected_format: str | None, expected_size: tuple[int, int] | None
) -> tuple[str, int, int]:
    """Decode and compare before anything is recorded: a wrong or broken image never becomes an artifact."""
    fmt, width, height = inspect_image(payload)
    if expected_format is not None and normalize_format(expected_format) != fmt:
        raise ZImageStorageError(
            f"image {name!r} is {fmt}, expected {normalize_format(expected_format)}; nothing written"
        )
    if expected_size is not None and (width, height) != tuple(expected_size):
        raise ZImageStorageError(
            f"image {name!r} is {width}x{height}, expected {expected_size[0]}x{expected_size[1]}; "
            "nothing written"
        )
    return fmt, width, height


def _header_matches(payload: bytes, record: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The format and size in `payload`'s header, when they are what `record` says; else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as img:
            fmt, (width, height) = _PIL_FORMAT_TO_EXT.get(img.format or ""), img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if fmt is None or (fmt, width, height) != (
        record.get("format"),
        record.get("width"),
        record.get("height"),
    ):
        return None
    return fmt, width, height


def _image_name(name: str, fmt: str) -> str:
    """Validate ``name`` and give it an extension matching the decoded format.

    Strict rather than sanitising because names come from our own code, so a bad one is a bug to
    surface. A name whose image extension contradicts the bytes is refused: a ``.png`` holding JPEG
    breaks browsers and content-type guessing downstream.
    """
    if not _SAFE_NAME.match(name) or name in (MANIFEST_NAME,):
        raise ZImageStorageError(
            f"invalid artifact name {name!r}: use 1-200 characters of [A-Za-z0-9._=-], not starting "
            f"with '.', '-', '_' or '=', and not {MANIFEST_NAME!r}"
        )
    stem, dot, ext = name.rpartition(".")
    if dot and ext.lower() in _FORMAT_ALIASES:
        if _FORMAT_ALIASES[ext.lower()] != fmt:
            raise ZImageStorageError(f"artifact name {name!r} has extension .{ext} but the data is {fmt}")
        return name
    return f"{name}.{fmt}"


@dataclass(frozen=True)
class ImageArtifact:
    """One stored image as recorded in the manifest and pushed to XCom.

    ``uri`` is ``str(ObjectStoragePath)``, including ``conn_id@`` when there is one, so
    ``ObjectStoragePath(artifact.uri)`` reaches the same object from any worker.
    """

    uri: str
    name: str
    sha256: str
    bytes: int
    format: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def describe(
        cls, target: ObjectStoragePath, payload: builtins.bytes, fmt: str, width: int, height: int
    ) -> ImageArtifact:
        """The record of bytes already checked by `check_image` and stored at `target`."""
        return cls(
            uri=str(target),
            name=target.name,
            sha256=hashlib.sha256(payload).hexdigest(),
            bytes=len(payload),
            format=fmt,
            width=width,
            height=height,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageArtifact:
        """Rebuild from a manifest entry, ignoring extra keys other modules may have added."""
        return cls(
            uri=str(data["uri"]),
            name=str(data["name"]),
            sha256=str(data["sha256"]),
            bytes=int(data["bytes"]),
            format=str(data["format"]),
            width=int(data["width"]),
            height=int(data["height"]),
        )

    @property
    def path(self) -> ObjectStoragePath:
        return ObjectStoragePath(self.uri)


def verify(artifact: ImageArtifact | Mapping[str, Any]) -> bool:
    """Whether the stored object still exists and matches the recorded sha256 (and size, if recorded).

    Returns ``False`` only for "missing" or "different"; any other error (permissions, network)
    propagates, because a ``False`` leads the caller to generate, and pay for, the image again.
    """
    expected_size: int | None
    if isinstance(artifact, ImageArtifact):
        uri, expected_sha, expected_size = artifact.uri, artifact.sha256, artifact.bytes
    else:
        uri, expected_sha = str(artifact["uri"]), str(artifact["sha256"])
        expected_size = int(artifact["bytes"]) if artifact.get("bytes") is not None else None
    target = as_path(uri)
    try:
        data = target.fs.cat_file(target.path)
    except FileNotFoundError:
        log.warning("Artifact %s is missing", uri)
        return False
    if expected_size is not None and len(data) != expected_size:
        log.warning("Artifact %s has %d bytes, expected %d", uri, len(data), expected_size)
        return False
    actual_sha = hashlib.sha256(data).hexdigest()
    if actual_sha != expected_sha.lower():
        log.warning("Artifact %s has sha256 %s, expected %s", uri, actual_sha, expected_sha)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The store


class ArtifactStore:
    """Lays out artifacts as ``{base}/{dag_id}/{run_id}/{task_id}/{map_index}/`` on any ObjectStoragePath.

    One directory per task instance (not per try) so that a retry lands where the earlier try wrote
    and finds its manifest, instead of generating, and paying for, the same images again.
    """

    def __init__(
        self,
        base: ObjectStoragePath | str | os.PathLike[str] | None = None,
        *,
        image_log_level: int = logging.INFO,
    ) -> None:
        self._base = default_output_path() if base is None else as_path(base)
        # A batch of thousands logs its progress instead of one line per stored image (DEBUG keeps them).
        self.image_log_level = image_log_level

    @classmethod
    def from_config(cls) -> ArtifactStore:
        return cls(default_output_path())

    @property
    def base(self) -> ObjectStoragePath:
        return self._base

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._base)!r})"

    def task_dir(
        self, dag_id: str, run_id: str, task_id: str, map_index: int | None = -1
    ) -> ObjectStoragePath:
        """The task instance's directory; see :func:`safe_segment` and ``UNMAPPED_SEGMENT`` for naming.

        Nothing is created: object stores have no directories, local ones are made on first write.
        """
        return (
            self._base
            / safe_segment(dag_id)
            / safe_segment(run_id)
            / safe_segment(task_id)
            / _map_index_segment(map_index)
        )

    def write_image(
        self,
        directory: ObjectStoragePath | str,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        expected_format: str | None = None,
        expected_size: tuple[int, int] | None = None,
        durable: bool = True,
    ) -> ImageArtifact:
        """Check, hash and atomically store one image (`durable=False`: see `copy_image`).

        ``expected_size`` is ``(width, height)``. The bytes are decoded and compared before anything
        is written, so a wrong or broken image never becomes an artifact. ``name`` without an image
        extension gets one from the decoded format.
        """
        payload = bytes(data)
        fmt, width, height = check_image(payload, name, expected_format, expected_size)
        target = write_bytes_atomic(as_path(directory) / _image_name(name, fmt), payload, durable=durable)
        artifact = ImageArtifact.describe(target, payload, fmt, width, height)
        log.log(
            self.image_log_level,
            "Stored %s (%s %dx%d, %d bytes, sha256 %s)",
            target,
            fmt,
            width,
            height,
            len(payload),
            artifact.sha256,
        )
        return artifact

    def copy_image(
        self,
        source: ObjectStoragePath | str,
        directory: ObjectStoragePath | str,
        name: str,
        payload: bytes,
        *,
        durable: bool = True,
    ) -> ImageArtifact:
        """Store again an image already verified at `source` (its bytes are `payload`, read by the caller
        to check its sha256).

        Within one object store reached through the same connection the copy is made by the service
        (`reuse="content"` over a catalogue then uploads nothing); elsewhere `write_image` stores the
        verified bytes again. `durable=False` (thousands of copies): a local file is not flushed on its
        own; call `flush()` once after the last copy, before anything lists them.
        """
        src = as_path(source)
        target_dir = as_path(directory)
        same_store = storage_location(src)[:2] == storage_location(target_dir)[:2]
        if not (
            src.protocol == target_dir.protocol and src.protocol in _SERVER_COPY_PROTOCOLS and same_store
        ):
            return self.write_image(target_dir, name, payload, durable=durable)
        fmt, width, height = check_image(payload, name, None, None)
        target = target_dir / _image_name(name, fmt)
        src.fs.copy(src.path, target.path)
        size = int(target.fs.info(target.path).get("size", -1))
        if size != len(payload):
            raise ZImageStorageError(
                f"server-side copy of {src} to {target} holds {size} bytes, expected {len(payload)}"
            )
        log.log(self.image_log_level, "Copied %s to %s in the store (%d bytes)", src, target, len(payload))
        return ImageArtifact.describe(target, payload, fmt, width, height)

    def copy_verified(
        self,
        source: str,
        directory: ObjectStoragePath | str,
        name: str,
        payload: bytes,
        record: Mapping[str, Any],
        *,
        durable: bool = True,
    ) -> ImageArtifact:
        """`copy_image` for bytes the caller read from `source` and found to match `record["sha256"]`,
        the record of an image fully decoded and checked when it was first stored.

        Local to local (a catalogue re-run on one disk), the bytes are written with os calls and only
        their header is read: its format and size must be the record's, or the full check runs. Still
        atomic (a temporary file renamed), still refused when the name is not a safe one.
        """
        target_dir = local_path_of(str(directory))
        header = _header_matches(payload, record) if target_dir is not None else None
        if target_dir is None or header is None or local_path_of(source) is None:
            return self.copy_image(source, directory, name, payload, durable=durable)
        fmt, width, height = header
        file_name = _image_name(name, fmt)
        target = os.path.join(target_dir, file_name)
        write_local_atomic(target, payload, durable)
        log.log(self.image_log_level, "Copied %s to %s (%d bytes)", source, target, len(payload))
        return ImageArtifact(
            uri=f"file://{target}",
            name=file_name,
            sha256=str(record["sha256"]).lower(),
            bytes=len(payload),
            format=fmt,
            width=width,
            height=height,
        )

    def flush(self) -> None:
        """Make the local files written with `durable=False` durable, all at once.

        One `sync` instead of two fsyncs per file: 100,000 reused copies otherwise wait on 200,000
        disk flushes. Object stores make every object durable when its PUT or copy returns."""
        if self._base.protocol in ("", "file", "local"):
            os.sync()

    def write_manifest(
        self, directory: ObjectStoragePath | str, manifest: Mapping[str, Any], *, image_per_line: bool = False
    ) -> ObjectStoragePath:
        """Write ``manifest.json``; call it only after every image it lists has been written.

        Its presence is the commit marker for the whole task directory (see the module docstring).
        `image_per_line` (a batch): the images are encoded one by one as they are written, one per line,
        so a 100,000-image manifest is never held in memory a second time as text.
        """
        if image_per_line:
            target, _ = write_chunks_atomic(
                as_path(directory) / MANIFEST_NAME, dumps_json_lines(dict(manifest), "images")
            )
        else:
            target = write_json_atomic(as_path(directory) / MANIFEST_NAME, dict(manifest))
        log.info("Wrote manifest %s", target)
        # After the manifest: the spend page counts only images that are committed (see `spend`).
        record_manifest(self._base, as_path(directory), manifest)
        return target

    def read_manifest(self, directory: ObjectStoragePath | str) -> dict[str, Any] | None:
        """The manifest, or ``None`` when there is none.

        A corrupt manifest is reported and treated as absent: atomic writes mean it cannot be a
        half-written one, so it was damaged from outside and the images it would describe cannot be
        trusted either; regenerating is the safe answer.
        """
        target = as_path(directory) / MANIFEST_NAME
        try:
            data = read_json(target)
        except ZImageStorageError as exc:
            log.warning("Ignoring unreadable manifest: %s", exc)
            return None
        if data is None:
            return None
        if not isinstance(data, dict):
            log.warning("Ignoring manifest %s: top level is %s, not an object", target, type(data).__name__)
            return None
        return data

    def verify(self, artifact: ImageArtifact | Mapping[str, Any]) -> bool:
        """See :func:`verify`."""
        return verify(artifact)
