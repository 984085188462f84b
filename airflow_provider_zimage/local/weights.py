"""Which weights stand behind a request: the maps from AIR ids to local weights, and their identity.

Two jobs, both about not trusting a name:

* `weight_maps` reads the `lora_paths` / `controlnet_paths` extras of a `zimage` connection (backend
  local). A connection is edited in the Airflow UI by people who do not deploy the workers, so its
  targets must resolve (symlinks followed) inside `[zimage] local_weights_roots`, the deployment's
  answer, as `file:` LoRAs a request names must (the in-process twin of `--lora-root`).
* `weights_id` says what a fingerprint records about weights: the path and a digest of the files'
  names, sizes, JSON configs and a sample of their bytes. Retrained weights keep the architecture (the
  same names and sizes), so sizes alone would call them the same picture and reuse a stale image;
  sampling reads about 1 MiB per file, not the 20 GB a full hash would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from airflow_provider_zimage.exceptions import ZImageValidationError

__all__ = ["request_weights", "weight_maps", "weights_id"]

SAMPLES = 16  # chunks read from a file larger than FULL_HASH_BYTES, evenly spaced, first and last included
SAMPLE_BYTES = 64 * 1024
FULL_HASH_BYTES = 8 * 1024 * 1024  # LoRAs and configs this small are hashed whole


def _file_digest(digest: Any, file: Path) -> None:
    size = file.stat().st_size
    digest.update(f"{size}\0".encode())
    with file.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            digest.update(handle.read())
            return
        step = (size - SAMPLE_BYTES) / (SAMPLES - 1)
        for index in range(SAMPLES):
            handle.seek(int(index * step))
            digest.update(handle.read(SAMPLE_BYTES))


def weights_id(source: str) -> str:
    """`<absolute path>@<digest>` for a local folder or file; anything else (a Hugging Face id) as is.

    The digest covers every file's relative path, size and a sample of its bytes (small files whole),
    so other weights under the same path give another id; reading it costs about 1 MiB per file.
    """
    path = Path(source)
    if not path.exists():
        return source
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix() if path.is_dir() else file.name}\0".encode())
        _file_digest(digest, file)
    return f"{os.path.abspath(source)}@{digest.hexdigest()[:16]}"


def _parsed(extra: str, value: Any) -> dict[str, str]:
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise _refused(extra, 'must be a JSON object {"<AIR id>": "<absolute path>", ...}')
    for air, target in value.items():
        if not isinstance(air, str) or not air.strip():
            raise _refused(extra, f"every key must be an AIR id such as civitai:123@4 (got {air!r})")
        if not isinstance(target, str) or not target.strip():
            raise _refused(
                extra, f"{air}: the target must be a folder path (a string), got {type(target).__name__}"
            )
    return {air.strip(): target.strip() for air, target in value.items()}


def _refused(extra: str, message: str) -> ZImageValidationError:
    return ZImageValidationError(
        f"connection extra {extra}: {message}", [{"parameter": extra, "message": message, "value": None}]
    )


def _inside(extra: str, air: str, target: str, roots: Sequence[str]) -> str:
    if not os.path.isabs(target):
        raise _refused(extra, f"{air}: the target must be an absolute path")
    resolved = Path(target).resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        allowed = ", ".join(roots) or "none"
        raise _refused(
            extra,
            f"{air}: the target is outside [zimage] local_weights_roots (allowed: {allowed}); weights a "
            "connection maps must be in a folder the deployment allows",
        )
    if not resolved.exists():
        raise _refused(extra, f"{air}: {target} does not exist")
    return str(resolved)


def weight_maps(
    lora_paths: Any, controlnet_paths: Any, roots: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The connection's `lora_paths` and `controlnet_paths` (JSON text or objects), every target an
    absolute path resolving inside `roots` (a LoRA may also be `hf:owner/repo`); a ControlNet target is a
    diffusers folder. Raises `ZImageValidationError` naming the extra, before any model is loaded."""
    loras = {}
    for air, target in _parsed("lora_paths", lora_paths).items():
        if target.startswith(("hf:", "huggingface:")):
            loras[air] = target  # the hub id is the weights; checked as any hf: LoRA when planned
        else:
            loras[air] = _inside("lora_paths", air, target, roots)
    controlnets = {}
    for air, target in _parsed("controlnet_paths", controlnet_paths).items():
        folder = _inside("controlnet_paths", air, target, roots)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise _refused(
                "controlnet_paths",
                f"{air}: {target} is not a diffusers ControlNet folder (no config.json; write one with "
                "ZImageControlNetModel.save_pretrained)",
            )
        controlnets[air] = folder
    return loras, controlnets


def _file_lora(name: str) -> str | None:
    if name.startswith("file://"):
        return unquote(urlparse(name).path)
    return name[5:] if name.startswith("file:") else None


def request_weights(
    request: Any, lora_paths: Mapping[str, str], controlnet_paths: Mapping[str, str]
) -> list[str]:
    """The weights ids of the LoRAs and the ControlNet `request` uses, for its fingerprint's origin.

    Empty for a request with neither, so those fingerprints stay what they were. A name that resolves
    to nothing is left out: planning refuses that request before anything is generated.
    """
    found = []
    for index, lora in enumerate(getattr(request, "lora", None) or []):
        name = str(lora.model)
        target = lora_paths.get(name) or _file_lora(name)
        if target is not None:
            found.append(f"lora[{index}]={weights_id(target)}")
    for index, entry in enumerate(getattr(request, "control_net", None) or []):
        folder = controlnet_paths.get(str(entry.model))
        if folder is not None:
            found.append(f"controlNet[{index}]={weights_id(folder)}")
    return found
