"""`reuse="content"`: a seeded picture stored once under an output_path is never paid for again there.

A small index file per fingerprint (`{output_path}/_zimage_content/{fingerprint}.json`), written after
the image was verified and stored, lists that picture's stored images. Any later run, DAG or task under
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
from collections.abc import Sequence
from typing import Any

from airflow_provider_zimage.storage.artifacts import (
    ArtifactStore,
    ZImageStorageError,
    as_path,
    read_json,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INDEX_DIR = "_zimage_content"
INDEX_VERSION = 1


def index_path(store: ArtifactStore, fingerprint: str) -> Any:
    return store.base / INDEX_DIR / f"{fingerprint}.json"


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
        copies = _reuse(store, key, directory)
        if copies is not None:
            return copies
    return None


def _reuse(store: ArtifactStore, fingerprint: str, directory: Any) -> list[dict[str, Any]] | None:
    try:
        data = read_json(index_path(store, fingerprint))
    except ZImageStorageError as exc:
        log.warning("Ignoring unreadable content index entry %s: %s", fingerprint, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not data.get("images"):
        return None
    sources: list[tuple[dict[str, Any], bytes]] = []
    for image in data["images"]:
        source = as_path(str(image["uri"]))
        try:
            payload = source.fs.cat_file(source.path)
        except FileNotFoundError:
            log.info("Content index lists %s, which is gone: generating again", image["uri"])
            return None
        if hashlib.sha256(payload).hexdigest() != str(image.get("sha256", "")).lower():
            log.warning("Content index: %s no longer matches its sha256: generating again", image["uri"])
            return None
        sources.append((image, payload))
    copies = []
    for image, payload in sources:
        name = str(image.get("image_uuid") or as_path(str(image["uri"])).stem)
        artifact = store.copy_image(str(image["uri"]), directory, name, payload)
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
