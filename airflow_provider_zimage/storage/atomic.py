"""Writes that a reader never sees half of, and the JSON encoding every record of the provider uses.

The lowest layer of storage: `storage` (artifacts and manifests), `spend` (the spend index), the
ledgers (`state`, `batch_state`), the content index and the webhook inbox all write through it, and it
imports none of them, so none of them has to import another to write a file.

Atomicity, by kind of storage (the one rule: nothing incomplete is ever visible under a final name):

* **Local filesystems** (``file://``, ``local://``, plain paths): the bytes go to a hidden temp file in
  the same directory (``.{name}.{random}.tmp``), are fsynced, then ``os.replace``-d over the final
  name, which POSIX guarantees to be atomic within one filesystem. On any exception the temp file is
  removed. Only a hard kill (SIGKILL, power loss) can leave a hidden ``.*.tmp`` behind; it is never
  mistaken for an artifact because nothing reads names starting with a dot.
* **Object stores** (s3, gcs, azure, ...): one ``fs.pipe_file`` call with the whole payload. s3fs turns
  that into a single ``PutObject`` (or, above 100 MiB, a multipart upload that it aborts on failure);
  either way S3 only makes an object visible once it is complete. We deliberately do *not* use
  ``path.open("wb")``: fsspec's buffered file commits whatever was buffered when the ``with`` block
  exits, *even when it exits with an exception*, which would publish a truncated object.
* **Anything else** fsspec can reach (sftp, hdfs, ...): temp name in the same directory plus
  ``fs.mv``, the closest those filesystems offer to a rename.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage.exceptions import ZImageStorageError

__all__ = [
    "as_path",
    "dumps_json",
    "dumps_json_lines",
    "read_json",
    "write_bytes_atomic",
    "write_chunks_atomic",
    "write_json_atomic",
]

_LOCAL_PROTOCOLS = frozenset({"", "file", "local"})
# Filesystems where one pipe_file call is one atomic object PUT (see module docstring).
_SINGLE_PUT_PROTOCOLS = frozenset(
    {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
)


def as_path(value: ObjectStoragePath | str | os.PathLike[str]) -> ObjectStoragePath:
    """Coerce to an ``ObjectStoragePath``, turning scheme-less local paths into absolute ``file://``.

    Why: URIs recorded in manifests and XCom must mean the same thing to a process with a different
    working directory, and ``ObjectStoragePath("/x")`` would otherwise print without a scheme.
    """
    if isinstance(value, ObjectStoragePath):
        if value.protocol:
            return value
        return ObjectStoragePath(f"file://{os.path.abspath(value.path)}")
    text = os.fspath(value)
    if "://" in text:
        return ObjectStoragePath(text)
    return ObjectStoragePath(f"file://{os.path.abspath(os.path.expanduser(text))}")


def local_path_of(uri: str) -> str | None:
    """The file a plain local URI names (`file:///...`: no connection, nothing escaped), else None.

    Why: such a location is read and written with os calls, without an `ObjectStoragePath` per file,
    where thousands of files are handled at once (`reuse="content"` over a catalogue)."""
    if not uri.startswith("file:///") or any(c in uri for c in "%?#"):
        return None
    return uri[len("file://") :]


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri` (FileNotFoundError when it is gone)."""
    local = local_path_of(uri)
    if local is not None:
        with open(local, "rb") as fh:
            return fh.read()
    path = as_path(uri)
    data: bytes = path.fs.cat_file(path.path)
    return data


def write_local_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """`write_bytes_atomic` for a local file path already known (see `local_path_of`)."""
    _write_local_atomic(path, data, durable)


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself; without it a crash can roll back to the old directory entry."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # Some filesystems (and all of Windows) refuse fsync on directories.
        pass
    finally:
        os.close(fd)


def _temp_name(final_name: str) -> str:
    return f".{final_name}.{uuid.uuid4().hex}.tmp"


def _write_local_atomic(target: str, data: bytes, durable: bool = True) -> None:
    _write_local_chunks_atomic(target, (data,), durable)


def _write_local_chunks_atomic(target: str, chunks: Iterable[bytes], durable: bool) -> None:
    """Write to a temporary file beside `target`, then rename: readers see the old file or the whole new
    one. The payload is written piece by piece, never all in memory at once (`_write_local_atomic`
    passes one piece)."""
    directory = os.path.dirname(target) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _temp_name(os.path.basename(target)))
    try:
        # Plain open() rather than mkstemp: mkstemp's 0600 mode would survive the rename and make
        # artifacts unreadable to other users of a shared output directory.
        with open(tmp, "xb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def _write_generic_atomic(path: ObjectStoragePath, data: bytes) -> None:
    fs = path.fs
    parent = path.parent
    tmp = parent / _temp_name(path.name)
    with contextlib.suppress(Exception):
        fs.makedirs(parent.path, exist_ok=True)
    try:
        fs.pipe_file(tmp.path, data)
        fs.mv(tmp.path, path.path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp.path)
        raise


def write_bytes_atomic(
    path: ObjectStoragePath | str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    *,
    durable: bool = True,
) -> ObjectStoragePath:
    """Write ``data`` so that ``path`` holds either its previous content or all of ``data``, never a prefix.

    Creates parent directories where the storage has them. See the module docstring for the mechanism
    per kind of storage. `durable=False` skips the fsyncs on a local disk (still all or nothing for a
    reader; after a power cut the file may be empty): for hints such as the content index, which are
    ignored when unreadable.
    """
    target = as_path(path)
    payload = bytes(data)
    protocol = target.protocol
    if protocol in _LOCAL_PROTOCOLS:
        _write_local_atomic(target.path, payload, durable)
    elif protocol in _SINGLE_PUT_PROTOCOLS:
        target.fs.pipe_file(target.path, payload)
    else:
        _write_generic_atomic(target, payload)
    return target


def write_chunks_atomic(
    path: ObjectStoragePath | str | os.PathLike[str], chunks: Iterable[bytes], *, durable: bool = True
) -> tuple[ObjectStoragePath, int]:
    """`write_bytes_atomic` for a payload made piece by piece (a 100,000-image manifest); returns the
    path and the bytes written. On a local disk the pieces are streamed to the temp file; an object
    store needs the whole payload for its one PUT (see the module docstring), joined once."""
    target = as_path(path)
    if target.protocol in _LOCAL_PROTOCOLS:
        counted = _Counted(chunks)
        _write_local_chunks_atomic(target.path, counted, durable)
        return target, counted.total
    payload = b"".join(chunks)
    write_bytes_atomic(target, payload, durable=durable)
    return target, len(payload)


class _Counted:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.total += len(chunk)
            yield chunk


def _json_default(obj: Any) -> Any:
    """Encode the few non-JSON types manifests and ledgers naturally contain."""
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, ObjectStoragePath):
        return str(obj)
    if hasattr(obj, "model_dump"):  # pydantic models
        return obj.model_dump(mode="json", by_alias=True)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any, *, indent: int | None = 2) -> bytes:
    """Deterministic encoding (sorted keys, UTF-8, trailing newline) so identical content diffs empty.

    `indent=None` is compact, and several times faster (only then does `json` use its C encoder): for
    files rewritten often and read by machines, such as a batch ledger of thousands of requests.
    """
    try:
        text = json.dumps(
            obj, indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise ZImageStorageError(f"cannot encode as JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def dumps_json_lines(obj: dict[str, Any], key: str, *, pairs: bool = False) -> Iterator[bytes]:
    """`obj` as one JSON document, piece by piece: `obj[key]` (a long list) one item per line.

    Sorted keys and the same encoding as `dumps_json`, so a reader parses what it always did; each
    item is encoded when its line is written (and may be made just then, by a generator), never the
    whole list at once. `pairs`: `obj[key]` yields (name, value) pairs, written as a JSON object.
    """
    yield b"{"
    for n, name in enumerate(sorted(obj)):
        head = ("," if n else "") + json.dumps(name) + ":"
        if name != key:
            yield head.encode("utf-8") + dumps_json(obj[name], indent=None).rstrip(b"\n")
            continue
        yield (head + ("{" if pairs else "[")).encode("utf-8")
        for i, item in enumerate(obj[name]):
            line = dumps_json(item[1] if pairs else item, indent=None).rstrip(b"\n")
            if pairs:
                line = json.dumps(str(item[0])).encode("utf-8") + b":" + line
            yield (b",\n" if i else b"\n") + line
        yield b"\n}" if pairs else b"\n]"
    yield b"}\n"


def write_json_atomic(
    path: ObjectStoragePath | str | os.PathLike[str],
    obj: Any,
    *,
    durable: bool = True,
    indent: int | None = 2,
) -> ObjectStoragePath:
    """Encode first, then write atomically: an unencodable object leaves the old file untouched."""
    return write_bytes_atomic(path, dumps_json(obj, indent=indent), durable=durable)


def read_json(path: ObjectStoragePath | str | os.PathLike[str]) -> Any | None:
    """Decoded JSON, or ``None`` when the file does not exist.

    Corrupt content raises :class:`ZImageStorageError` rather than reading as absent, because callers
    such as the submission ledger must not conclude "never submitted" (and pay again) from a file
    they could not read; each caller chooses its own recovery.
    """
    target = as_path(path)
    try:
        raw = target.fs.cat_file(target.path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZImageStorageError(f"{target} does not contain valid JSON: {exc}") from exc
