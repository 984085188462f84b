"""`reuse="content"`: a seeded picture stored once under an output_path is never paid for again there.

An index written after the images were verified and stored lists each picture's stored images: a
batch writes one index per task instance, in 16 shards by the fingerprint's first hex digit
(`{output_path}/_zimage_content/batches/{task instance}/{digit}.json`), never a file per image; a
single-image task writes one small file per fingerprint (`_zimage_content/{fingerprint}.json`, also
what releases up to 0.3 wrote for batches). Both are read by both operators. Any later run, DAG or task under
the same output_path that asks for the same fingerprint (picture-only request fingerprint, plus model and
connection) gets a copy in its own folder, with `reused_from` and cost 0 (made by the object store
itself where it can copy, `ArtifactStore.copy_image`). The index is a hint, never the
truth: an entry whose file is gone or whose sha256 no longer matches is ignored and the image is
generated again. Unseeded requests are never looked up (the user asked for a new random picture).

Two tasks asking for the same new fingerprint at the same moment both pay, once each: there is no lock,
the second index write simply replaces the first.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from airflow_provider_zimage.storage.artifacts import (
    ArtifactStore,
    ZImageStorageError,
    as_path,
    dumps_json,
    read_bytes,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INDEX_DIR = "_zimage_content"
BATCHES_DIR = "batches"
INDEX_VERSION = 1
SHARDS = "0123456789abcdef"

Images = list[dict[str, Any]]


def index_path(store: ArtifactStore, fingerprint: str) -> Any:
    return store.base / INDEX_DIR / f"{fingerprint}.json"


def batch_index_dir(store: ArtifactStore, batch_id: str) -> Any:
    """Where one task instance's batch index lives (`batch_id`: a digest naming the task instance)."""
    return store.base / INDEX_DIR / BATCHES_DIR / batch_id


def batch_id(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The name of one task instance's batch index: every backend's batch writes under the same one."""
    name = "\x1f".join([dag_id, run_id, task_id, str(map_index)])
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _shard(fingerprint: str) -> str:
    first = fingerprint[:1].lower()
    return first if first in SHARDS else "0"


def record_batch(store: ArtifactStore, batch_id: str, pictures: Iterable[tuple[str, Images]]) -> int:
    """Index a batch's stored pictures, (fingerprint, images) each, as 16 shard objects; returns bytes.

    Written once when the batch finishes (a crashed try's index is written by the retry that finishes
    it): the index is a hint, and 16 objects for 100,000 images replace 100,000 files.
    """
    # References grouped by shard; each shard's copies (without the batch's own `index`) are made
    # while it is written, so 100,000 images are never copied at once.
    shards: dict[str, list[tuple[str, Images]]] = {}
    for fingerprint, images in pictures:
        if images:
            shards.setdefault(_shard(fingerprint), []).append((fingerprint, images))
    directory = batch_index_dir(store, batch_id)
    written = 0
    for shard in sorted(shards):
        document = {
            "version": INDEX_VERSION,
            "pictures": {
                fingerprint: [{k: v for k, v in i.items() if k != "index"} for i in images]
                for fingerprint, images in shards.pop(shard)
            },
        }
        # Not fsynced, as the per-fingerprint files: a lost index costs a future payment, nothing else.
        payload = dumps_json(document, indent=None)
        write_bytes_atomic(directory / f"{shard}.json", payload, durable=False)
        written += len(payload)
    return written


class ContentIndex:
    """Everything indexed under one output_path, read once: what a batch looks each row up in.

    One listing of `_zimage_content/` and one read per batch shard, instead of one read per row: a
    catalogue of 100,000 rows asks about each of them.
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        # Every batch that indexed a fingerprint: one whose files are gone or changed is passed over
        # for the next (a later batch may have generated the picture again).
        self.pictures: dict[str, list[Images]] = {}
        self.files: set[str] = set()
        root = store.base / INDEX_DIR
        try:
            children = list(root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return
        for child in children:
            if child.name == BATCHES_DIR:
                self._read_batches(child)
            elif child.name.endswith(".json"):
                self.files.add(child.name[: -len(".json")])

    def _read_batches(self, folder: Any) -> None:
        try:
            batches = list(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return
        for batch in batches:
            for shard in SHARDS:
                for fingerprint, images in _read_shard(batch / f"{shard}.json").items():
                    self.pictures.setdefault(fingerprint, []).append(images)

    def reuse(
        self, fingerprint: str, directory: Any, legacy: Sequence[str] = (), *, durable: bool = True
    ) -> Images | None:
        """As `reuse`, from what was read at construction (an old per-fingerprint file still counts).

        `durable=False`: the copies on a local disk are not flushed one by one; the caller calls
        `ArtifactStore.flush()` once after all of them."""
        for key in (fingerprint, *legacy):
            found = list(self.pictures.get(key, ()))
            if key in self.files:
                found.append(_read_file(self.store, key) or [])
            for images in found:
                copies = _copies(self.store, images, directory, durable) if images else None
                if copies is not None:
                    return copies
        return None


def record(store: ArtifactStore, fingerprint: str, images: list[dict[str, Any]]) -> None:
    """Remember where this picture is stored; call only after every image was written and verified."""
    if not images:
        return
    # Not fsynced: an entry lost or emptied by a power cut is unreadable, hence ignored (one more
    # payment later), and a catalogue of thousands would otherwise wait on thousands of disk flushes.
    write_json_atomic(
        index_path(store, fingerprint), {"version": INDEX_VERSION, "images": images}, durable=False
    )


def reuse(
    store: ArtifactStore, fingerprint: str, directory: Any, legacy: Sequence[str] = ()
) -> list[dict[str, Any]] | None:
    """Copies of the indexed images in `directory` (cost 0, `reused_from`), or None to generate.

    `legacy`: what earlier releases called the same picture, looked up after `fingerprint`. Pass only
    fingerprints that surely were this picture: an entry records no request to check it against.
    """
    for key in (fingerprint, *legacy):
        for images in (_read_file(store, key), *_batch_lookup(store, key)):
            copies = _copies(store, images, directory) if images else None
            if copies is not None:
                return copies
    return None


def _read_file(store: ArtifactStore, fingerprint: str) -> Images | None:
    try:
        data = read_json(index_path(store, fingerprint))
    except ZImageStorageError as exc:
        log.warning("Ignoring unreadable content index entry %s: %s", fingerprint, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not data.get("images"):
        return None
    images = data["images"]
    return images if isinstance(images, list) else None


def _read_shard(path: Any) -> dict[str, Images]:
    """One shard of a batch index, or nothing when it is missing or unreadable (a hint)."""
    try:
        data = read_json(path)
    except ZImageStorageError as exc:
        log.warning("Ignoring unreadable content index %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return {}
    pictures = data.get("pictures")
    if not isinstance(pictures, dict):
        return {}
    return {k: v for k, v in pictures.items() if isinstance(v, list) and v}


def _batch_lookup(store: ArtifactStore, fingerprint: str) -> Iterator[Images]:
    """A single image's lookup in the batch indexes: one shard per batch, not the whole index."""
    folder = store.base / INDEX_DIR / BATCHES_DIR
    try:
        batches = sorted(folder.iterdir(), key=lambda p: p.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for batch in batches:
        images = _read_shard(batch / f"{_shard(fingerprint)}.json").get(fingerprint)
        if images:
            yield images


def _copies(store: ArtifactStore, indexed: Images, directory: Any, durable: bool = True) -> Images | None:
    """Verified copies of `indexed` in `directory`, or None when any source is gone or changed.

    Each source is read once: the bytes whose sha256 matched are the bytes copied."""
    sources: list[tuple[dict[str, Any], bytes]] = []
    for image in indexed:
        if not isinstance(image, dict) or not isinstance(image.get("uri"), str):
            return None  # a hint from storage, not trusted: a malformed entry means generate
        try:
            payload = read_bytes(image["uri"])
        except FileNotFoundError:
            log.info("Content index lists %s, which is gone: generating again", image["uri"])
            return None
        except OSError as exc:  # a folder, no permission: as good as gone
            log.warning(
                "Content index lists %s, which cannot be read (%s): generating again", image["uri"], exc
            )
            return None
        if hashlib.sha256(payload).hexdigest() != str(image.get("sha256", "")).lower():
            log.warning("Content index: %s no longer matches its sha256: generating again", image["uri"])
            return None
        sources.append((image, payload))
    copies = []
    for image, payload in sources:
        name = str(image.get("image_uuid") or as_path(image["uri"]).stem)
        artifact = store.copy_verified(image["uri"], directory, name, payload, image, durable=durable)
        # The copy's own location and hash; what the picture is (seed, model, imageUUID) is the source's.
        copies.append(
            {
                **image,
                "uri": artifact.uri,
                "sha256": artifact.sha256,
                "bytes": artifact.bytes,
                "cost": 0.0,
                "reused_from": image.get("reused_from") or image["uri"],
            }
        )
    return copies
