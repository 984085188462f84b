"""ArtifactStore: atomic writes, image checks, manifests and layout, on local disk and on a real S3 server."""

from __future__ import annotations

import os
import sys
import tempfile

# Airflow reads AIRFLOW_HOME (and creates $AIRFLOW_HOME/logs) the moment it is imported, so this has to
# happen before the imports below. If something imported Airflow earlier (a conftest), that earlier
# code owns the decision and we leave it alone.
if "airflow" not in sys.modules:
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="zimage-test-airflow-home-")
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = (
        f"sqlite:///{os.path.join(os.environ['AIRFLOW_HOME'], 'airflow.db')}"
    )

import asyncio
import datetime
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow.sdk import ObjectStoragePath
from PIL import Image

from airflow_provider_zimage.compat import storage_location
from airflow_provider_zimage.exceptions import ZImageError
from airflow_provider_zimage.storage import artifacts as storage
from airflow_provider_zimage.storage import atomic as storage_atomic
from airflow_provider_zimage.storage.artifacts import (
    ArtifactStore,
    ImageArtifact,
    ZImageStorageError,
    as_path,
    default_output_path,
    read_json,
    safe_segment,
    verify,
    write_bytes_atomic,
    write_json_atomic,
)

try:  # `tests` is a package once tests/__init__.py exists; before that pytest puts tests/ on sys.path.
    from tests.s3_server import MOTO_CONN_ID, MotoS3Server, moto_s3_server, s3_bucket
except ImportError:  # pragma: no cover
    from s3_server import MOTO_CONN_ID, MotoS3Server, moto_s3_server, s3_bucket  # noqa: F401

RUN_ID = "manual__2026-01-01T00:00:00+00:00"


@pytest.fixture(scope="session", autouse=True)
def airflow_home() -> Iterator[Path]:
    """Guarantee a throw-away AIRFLOW_HOME even when Airflow was imported before this module.

    (Later than ideal in that case, since Airflow has read the variable already, but nothing here
    depends on what it read.)
    """
    previous = os.environ.get("AIRFLOW_HOME")
    if previous is None:
        os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="zimage-test-airflow-home-")
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    yield home
    if home.name.startswith("zimage-test-airflow-home-"):
        shutil.rmtree(home, ignore_errors=True)
    if previous is None:
        os.environ.pop("AIRFLOW_HOME", None)


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


def files_in(directory: Path) -> list[str]:
    """Every entry, hidden ones included (temp files are hidden)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(ObjectStoragePath(f"file://{tmp_path}/out"))


@pytest.fixture
def task_dir(store: ArtifactStore) -> ObjectStoragePath:
    return store.task_dir("my_dag", RUN_ID, "generate", -1)


def local(path: ObjectStoragePath) -> Path:
    return Path(path.path)


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("pil_format", "expected", "declared"),
    [("PNG", "png", "PNG"), ("JPEG", "jpg", "JPG"), ("JPEG", "jpg", "jpeg"), ("WEBP", "webp", "webp")],
)
def test_write_image_records_digest_size_format_dimensions(store, task_dir, pil_format, expected, declared):
    data = make_image(pil_format, (64, 48))

    art = store.write_image(task_dir, "image-0", data, expected_format=declared, expected_size=(64, 48))

    assert art == ImageArtifact(
        uri=str(task_dir / f"image-0.{expected}"),
        name=f"image-0.{expected}",
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        format=expected,
        width=64,
        height=48,
    )
    assert art.uri.startswith("file:///")
    assert local(task_dir).joinpath(art.name).read_bytes() == data
    assert files_in(local(task_dir)) == [art.name]  # no temp file left behind
    assert verify(art) and store.verify(art.to_dict())
    assert ImageArtifact.from_dict({**art.to_dict(), "extra": 1}) == art
    assert json.loads(json.dumps(art.to_dict())) == art.to_dict()


def test_write_image_without_expectations_and_overwrite(store, task_dir):
    first = store.write_image(task_dir, "a.png", make_image("PNG", (8, 8)))
    second = store.write_image(task_dir, "a.png", make_image("PNG", (16, 8)))
    assert (first.width, second.width) == (8, 16)
    assert verify(second) and not verify(first)
    assert files_in(local(task_dir)) == ["a.png"]


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (make_image("PNG"), {"expected_format": "jpg"}, "is png, expected jpg"),
        (make_image("JPEG"), {"expected_format": "webp"}, "is jpg, expected webp"),
        (make_image("PNG", (64, 48)), {"expected_size": (48, 64)}, "is 64x48, expected 48x64"),
        (b"definitely not an image", {}, "could not be decoded"),
        (make_image("PNG")[:-40], {}, "could not be decoded"),  # truncated download
        (make_image("JPEG")[:200], {}, "could not be decoded"),
        (b"", {}, "empty"),
        (make_image("GIF"), {}, "GIF is not supported"),
        (make_image("PNG"), {"expected_format": "tiff"}, "unsupported image format"),
    ],
    ids=[
        "png-not-jpg",
        "jpg-not-webp",
        "size",
        "garbage",
        "truncated-png",
        "truncated-jpg",
        "empty",
        "gif",
        "bad-fmt",
    ],
)
def test_bad_images_refused_before_anything_is_written(store, task_dir, data, kwargs, message):
    with pytest.raises(ZImageStorageError, match=message) as info:
        store.write_image(task_dir, "image-0", data, **kwargs)
    assert isinstance(info.value, ZImageError)
    assert not local(store.base).exists()  # not even the directory


@pytest.mark.parametrize("name", ["../escape.png", "a/b.png", ".hidden.png", "", "manifest.json", "x" * 201])
def test_bad_names_refused(store, task_dir, name):
    with pytest.raises(ZImageStorageError, match="invalid artifact name"):
        store.write_image(task_dir, name, make_image("PNG"))
    assert not local(store.base).exists()


def test_extension_contradicting_the_bytes_is_refused(store, task_dir):
    with pytest.raises(ZImageStorageError, match="extension .png but the data is jpg"):
        store.write_image(task_dir, "image.png", make_image("JPEG"))
    art = store.write_image(task_dir, "image.JPEG", make_image("JPEG"))
    assert art.name == "image.JPEG"


def test_image_bytes_never_logged(store, task_dir, caplog):
    data = make_image("PNG")
    caplog.set_level(logging.DEBUG)
    store.write_image(task_dir, "img", data)
    with pytest.raises(ZImageStorageError) as info:
        store.write_image(task_dir, "img", data[:-40])
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("airflow_provider_zimage")]
    assert ours  # the success was logged...
    text = "\n".join(ours) + str(info.value)
    for needle in (data[:16].hex(), repr(data[:16]), "IHDR", "\\x89PNG"):  # ...without any payload
        assert needle not in text


# ------------------------------------------------------------------------------------------- atomicity


class _CrashingFile:
    """A real file whose write() stores the first `limit` bytes, then fails like a full disk or a kill."""

    def __init__(self, fh, limit: int) -> None:
        self._fh = fh
        self._limit = limit

    def write(self, data: bytes) -> int:
        self._fh.write(data[: self._limit])
        self._fh.flush()
        raise OSError(28, "No space left on device (simulated)")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def _crash_after(monkeypatch, limit: int, seen: list[str]) -> None:
    import builtins

    def crashing_open(file, mode="r", *args, **kwargs):
        seen.append(os.fspath(file))
        return _CrashingFile(builtins.open(file, mode, *args, **kwargs), limit)

    monkeypatch.setattr(storage_atomic, "open", crashing_open, raising=False)


def test_crash_mid_write_leaves_no_partial_and_no_temp(store, task_dir, monkeypatch):
    seen: list[str] = []
    _crash_after(monkeypatch, 100, seen)

    with pytest.raises(OSError, match="simulated"):
        store.write_image(task_dir, "image-0", make_image("PNG", (64, 48)))

    # the writer really did put 100 bytes on disk, under a hidden temp name in the same directory
    assert len(seen) == 1 and Path(seen[0]).parent == local(task_dir) and Path(seen[0]).name.startswith(".")
    assert files_in(local(task_dir)) == []  # neither the final name nor the temp file


def test_crash_mid_rewrite_keeps_the_previous_content(store, task_dir, monkeypatch):
    first = store.write_image(task_dir, "image-0.png", make_image("PNG", (8, 8)))
    _crash_after(monkeypatch, 10, [])

    with pytest.raises(OSError):
        store.write_image(task_dir, "image-0.png", make_image("PNG", (16, 16)))

    assert files_in(local(task_dir)) == ["image-0.png"] and verify(first)


def test_crash_at_rename_removes_temp(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(storage_atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_bytes_atomic(str(tmp_path / "d" / "x.bin"), b"abc")
    assert files_in(tmp_path / "d") == []


def test_unencodable_json_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "ledger.json"
    write_json_atomic(str(target), {"a": 1})
    with pytest.raises(ZImageStorageError, match="cannot encode"):
        write_json_atomic(str(target), {"a": object()})
    with pytest.raises(ZImageStorageError, match="cannot encode"):
        write_json_atomic(str(target), {"a": float("nan")})
    assert read_json(str(target)) == {"a": 1}
    assert files_in(tmp_path) == ["ledger.json"]


def test_generic_fsspec_filesystem_uses_temp_and_move(monkeypatch):
    """Filesystems that are neither local nor single-PUT object stores get temp name + mv."""
    from airflow.sdk.io import store as io_store
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    io_store.attach("memory", fs=fs)
    monkeypatch.setattr(storage_atomic, "_SINGLE_PUT_PROTOCOLS", frozenset())
    root = f"/zimage-generic-{os.getpid()}"
    try:
        target = ObjectStoragePath(f"memory://{root}/d/x.json")
        write_json_atomic(target, {"ok": True})
        assert read_json(target) == {"ok": True}
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/x.json"]

        monkeypatch.setattr(fs, "mv", lambda *a, **k: (_ for _ in ()).throw(OSError("mv failed (simulated)")))
        with pytest.raises(OSError, match="simulated"):
            write_bytes_atomic(ObjectStoragePath(f"memory://{root}/d/y.bin"), b"abc")
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/x.json"]
    finally:
        fs.rm(root, recursive=True)
        io_store._STORE_CACHE.pop("memory", None)


# ------------------------------------------------------------------------------------- JSON & manifest


def test_manifest_round_trip(store, task_dir):
    art = store.write_image(task_dir, "image-0", make_image("WEBP"))
    manifest = {
        "version": 1,
        "task_uuid": "3f1c…",
        "prompt": "a cat — in Zürich",
        "images": [art.to_dict()],
        "created": datetime.datetime(2026, 1, 1, 12, 0),
    }
    assert store.read_manifest(task_dir) is None

    path = store.write_manifest(task_dir, manifest)

    assert str(path) == str(task_dir / "manifest.json")
    back = store.read_manifest(task_dir)
    assert back == {**manifest, "created": "2026-01-01T12:00:00"}
    assert all(store.verify(img) for img in back["images"])
    assert sorted(files_in(local(task_dir))) == ["image-0.webp", "manifest.json"]


def test_corrupt_manifest_reads_as_absent_with_warning(store, task_dir, caplog):
    local(task_dir).mkdir(parents=True)
    (local(task_dir) / "manifest.json").write_text('{"images": [')
    with caplog.at_level(logging.WARNING, logger="airflow_provider_zimage.storage.artifacts"):
        assert store.read_manifest(task_dir) is None
    assert "unreadable manifest" in caplog.text

    (local(task_dir) / "manifest.json").write_text("[1, 2]")
    assert store.read_manifest(task_dir) is None


def test_read_json_absent_and_corrupt(tmp_path):
    assert read_json(str(tmp_path / "nope.json")) is None
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ZImageStorageError, match="valid JSON"):
        read_json(str(tmp_path / "bad.json"))


def test_json_is_deterministic(tmp_path):
    write_json_atomic(str(tmp_path / "a.json"), {"b": 1, "a": [1, 2]})
    write_json_atomic(str(tmp_path / "b.json"), {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_verify_detects_tampering_and_deletion(store, task_dir):
    art = store.write_image(task_dir, "img", make_image("PNG"))
    file = local(task_dir) / art.name
    file.write_bytes(file.read_bytes()[:-1] + b"\x00")
    assert not verify(art)
    assert not verify({"uri": art.uri, "sha256": art.sha256})  # size not recorded: digest still checked
    file.unlink()
    assert not verify(art)


# ---------------------------------------------------------------------------------------------- layout


def test_run_id_sanitising_is_readable_safe_and_injective():
    seg = safe_segment(RUN_ID)
    digest = hashlib.sha256(RUN_ID.encode()).hexdigest()[:8]
    assert seg == f"manual__2026-01-01T00_00_00_00_00-{digest}"
    assert safe_segment(RUN_ID) == seg  # deterministic: a retry finds the same directory
    # run ids Airflow accepts that differ only in replaced characters must not share a directory
    assert len({safe_segment(r) for r in ["a:b", "a+b", "a_b", "a~b"]}) == 4
    assert safe_segment("scheduled__2026-01-01") == "scheduled__2026-01-01"
    assert safe_segment("group.task_1") == "group.task_1"
    for nasty in ["..", ".", ".hidden", "a/../b", "x" * 300, "ünïcode", "a b\nc"]:
        s = safe_segment(nasty)
        assert storage._UNSAFE_CHARS.search(s) is None and not s.startswith(".") and len(s) <= 200
    with pytest.raises(ValueError):
        safe_segment("")


def test_task_dir_layout(store, tmp_path):
    d = store.task_dir("my_dag", RUN_ID, "gen", -1)
    assert str(d) == f"file://{tmp_path}/out/my_dag/{safe_segment(RUN_ID)}/gen/unmapped"
    assert store.task_dir("my_dag", RUN_ID, "gen", 3).name == "3"
    assert store.task_dir("my_dag", RUN_ID, "gen", None).name == "unmapped"
    with pytest.raises(ValueError):
        store.task_dir("my_dag", RUN_ID, "gen", -2)
    assert not (tmp_path / "out").exists()  # nothing created until something is written


def test_plain_paths_become_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(as_path("rel/dir")) == f"file://{tmp_path}/rel/dir"
    assert str(ArtifactStore(str(tmp_path)).base) == f"file://{tmp_path}"
    assert str(ArtifactStore(ObjectStoragePath(str(tmp_path))).base) == f"file://{tmp_path}"
    assert str(ArtifactStore(tmp_path).base) == f"file://{tmp_path}"


def test_default_output_path_from_config(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", f"file://{tmp_path}/configured")
    assert str(default_output_path()) == f"file://{tmp_path}/configured"
    assert str(ArtifactStore().base) == f"file://{tmp_path}/configured"
    monkeypatch.setenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", "s3://aws_default@some-bucket/zimage")
    path = default_output_path()
    assert (path.protocol, *storage_location(path)) == (
        "s3",
        "aws_default",
        "some-bucket",
        "zimage",
    )


def test_default_output_path_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))
    path = default_output_path()
    assert str(path) == f"file://{tmp_path}/home/zimage-artifacts"
    assert (tmp_path / "home" / "zimage-artifacts").is_dir()
    assert str(ArtifactStore.from_config().base) == str(path)


# -------------------------------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_images_and_manifest_against_moto_server(moto_s3_server: MotoS3Server, s3_bucket: str):
    store = ArtifactStore(f"s3://{MOTO_CONN_ID}@{s3_bucket}/prefix")
    d = store.task_dir("my_dag", RUN_ID, "gen", 0)
    png, jpg = make_image("PNG", (32, 16)), make_image("JPEG", (32, 16))

    assert store.read_manifest(d) is None
    arts = [
        store.write_image(d, "image-0", png, expected_format="png", expected_size=(32, 16)),
        store.write_image(d, "image-1", jpg, expected_format="JPG", expected_size=(32, 16)),
    ]
    with pytest.raises(ZImageStorageError):
        store.write_image(d, "image-2", png, expected_format="webp")
    store.write_manifest(d, {"images": [a.to_dict() for a in arts]})

    prefix = f"prefix/my_dag/{safe_segment(RUN_ID)}/gen/0/"
    # exactly the final objects: no temp keys, nothing for the refused image
    assert moto_s3_server.list_keys(s3_bucket) == [
        prefix + n for n in ("image-0.png", "image-1.jpg", "manifest.json")
    ]
    client = moto_s3_server.client()
    assert client.get_object(Bucket=s3_bucket, Key=prefix + "image-0.png")["Body"].read() == png

    assert arts[0].uri == f"s3://{MOTO_CONN_ID}@{s3_bucket}/{prefix}image-0.png"
    assert storage_location(arts[0].path)[0] == MOTO_CONN_ID  # the URI alone reaches the object again
    manifest = store.read_manifest(d)
    assert manifest == {"images": [a.to_dict() for a in arts]}
    assert all(verify(img) for img in manifest["images"])

    client.put_object(Bucket=s3_bucket, Key=prefix + "image-1.jpg", Body=b"tampered")
    client.delete_object(Bucket=s3_bucket, Key=prefix + "image-0.png")
    assert [verify(img) for img in manifest["images"]] == [False, False]

    client.put_object(Bucket=s3_bucket, Key=prefix + "manifest.json", Body=b"{broken")
    assert store.read_manifest(d) is None


@pytest.mark.s3
def test_s3_generic_json_helpers(moto_s3_server: MotoS3Server, s3_bucket: str):
    path = ObjectStoragePath(f"s3://{MOTO_CONN_ID}@{s3_bucket}/ledger/abc.json")
    assert read_json(path) is None
    write_json_atomic(path, {"task_uuid": "abc", "state": "submitted"})
    write_json_atomic(str(path), {"task_uuid": "abc", "state": "done"})  # string URI with conn id works too
    assert read_json(str(path)) == {"task_uuid": "abc", "state": "done"}
    assert moto_s3_server.list_keys(s3_bucket) == ["ledger/abc.json"]


@pytest.mark.s3
async def test_s3_from_async_code_via_to_thread(moto_s3_server: MotoS3Server, s3_bucket: str):
    """What triggers and the webhook app must do: Airflow's S3 fs factory calls asyncio.run()."""
    uri = f"s3://{MOTO_CONN_ID}@{s3_bucket}/inbox/evt.json"
    await asyncio.to_thread(write_json_atomic, uri, {"event": 1})
    assert await asyncio.to_thread(read_json, uri) == {"event": 1}


@pytest.mark.s3
def test_s3_content_reuse_is_a_copy_inside_the_store(
    moto_s3_server: MotoS3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
):
    """`reuse="content"` on S3: yesterday's image appears in today's folder without the worker
    uploading its bytes again (CopyObject), and it verifies like any stored image."""
    from airflow_provider_zimage.jobs import content_index

    store = ArtifactStore(f"s3://{MOTO_CONN_ID}@{s3_bucket}/shop")
    day1 = store.task_dir("shop", "scheduled__day1", "shots", None)
    png = make_image("PNG", (32, 16))
    art = store.write_image(day1, "img-1", png)
    content_index.record(store, "f" * 64, [{**art.to_dict(), "image_uuid": "img-1", "seed": 7}])

    day2 = store.task_dir("shop", "scheduled__day2", "shots", None)
    uploads: list[str] = []
    fs = as_path(day2).fs
    real_pipe = fs.pipe_file

    def pipe_file(path: str, value: bytes, **kwargs: object) -> object:
        uploads.append(path)
        return real_pipe(path, value, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", pipe_file)
    copies = content_index.reuse(store, "f" * 64, day2)

    assert copies is not None and len(copies) == 1
    copy = copies[0]
    assert copy["uri"].endswith(f"/{safe_segment('scheduled__day2')}/shots/unmapped/img-1.png")
    assert copy["reused_from"] == art.uri and copy["cost"] == 0.0 and copy["seed"] == 7
    assert verify(copy) and copy["sha256"] == art.sha256
    assert not [p for p in uploads if p.endswith(".png")], f"image bytes uploaded again: {uploads}"
    client = moto_s3_server.client()
    key = f"shop/shop/{safe_segment('scheduled__day2')}/shots/unmapped/img-1.png"
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == png


def test_local_content_reuse_writes_an_atomic_copy(store: ArtifactStore, tmp_path: Path):
    """On a local disk there is no service to copy for us: the verified bytes are written again."""
    from airflow_provider_zimage.jobs import content_index

    day1 = store.task_dir("shop", "scheduled__day1", "shots", None)
    art = store.write_image(day1, "img-1", make_image("PNG", (32, 16)))
    content_index.record(store, "e" * 64, [{**art.to_dict(), "image_uuid": "img-1"}])
    day2 = store.task_dir("shop", "scheduled__day2", "shots", None)
    (copy,) = content_index.reuse(store, "e" * 64, day2) or []
    assert verify(copy) and copy["sha256"] == art.sha256 and copy["uri"] != art.uri
    assert files_in(Path(as_path(day2).path)) == ["img-1.png"]  # no temp file left behind


def test_local_content_reuse_copies_a_verified_image_without_decoding_it_again(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalogue re-run copies 99,000 images: each was fully decoded when its sha256 was recorded, so
    a copy whose bytes match that sha256 reads only the header, not every pixel again."""
    from PIL import ImageFile

    from airflow_provider_zimage.jobs import content_index

    day1 = store.task_dir("shop", "scheduled__day1", "shots", None)
    art = store.write_image(day1, "img-1", make_image("PNG", (32, 16)))
    content_index.record(store, "e" * 64, [{**art.to_dict(), "image_uuid": "img-1"}])
    decodes: list[object] = []
    real_load = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> object:
        decodes.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    day2 = store.task_dir("shop", "scheduled__day2", "shots", None)
    (copy,) = content_index.reuse(store, "e" * 64, day2) or []
    assert decodes == []
    assert verify(copy) and copy["sha256"] == art.sha256 and copy["uri"] != art.uri
    assert copy["uri"] == str(as_path(day2) / "img-1.png")
    assert (copy["format"], copy["width"], copy["height"], copy["bytes"]) == ("png", 32, 16, art.bytes)
    assert files_in(Path(as_path(day2).path)) == ["img-1.png"]  # written atomically: no temp file left


def test_local_content_reuse_refuses_an_indexed_non_image_even_with_its_sha256(
    store: ArtifactStore, tmp_path: Path
) -> None:
    """The index is a hint from storage: an entry naming a file that is no image, with that file's true
    sha256, fails the check (the batch then pays for the row) instead of being copied as a picture."""
    from airflow_provider_zimage.jobs import content_index

    day1 = Path(as_path(store.task_dir("shop", "scheduled__day1", "shots", None)).path)
    day1.mkdir(parents=True)
    fake = day1 / "img-1.png"
    fake.write_bytes(b"not a picture at all" * 10)
    entry = {
        "uri": f"file://{fake}",
        "name": "img-1.png",
        "sha256": hashlib.sha256(fake.read_bytes()).hexdigest(),
        "bytes": 200,
        "format": "png",
        "width": 32,
        "height": 16,
        "image_uuid": "img-1",
    }
    content_index.record(store, "d" * 64, [entry])
    day2 = store.task_dir("shop", "scheduled__day2", "shots", None)
    with pytest.raises(ZImageError, match="could not be decoded"):
        content_index.reuse(store, "d" * 64, day2)
    assert not Path(as_path(day2).path).exists() or files_in(Path(as_path(day2).path)) == []
