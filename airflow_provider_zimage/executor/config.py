"""What one executor process serves, parsed once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_zimage.exceptions import ZImageError
from airflow_provider_zimage.local.weights import weights_id  # the id /health reports, one definition
from airflow_provider_zimage.origins import parse_origins

__all__ = ["ExecutorConfig", "weights_id"]


@dataclass(frozen=True)
class ExecutorConfig:
    """:param models: AIR id -> weights (a diffusers folder or a Hugging Face id), loaded once each.
    :param devices: torch devices, one queue and one pipeline per model on each.
    :param token: the bearer token every `/v1` request must carry (the connection's password).
    :param max_batch: images denoised together in one pipeline call, at most.
    :param output_dir: where task records and images are kept so they survive a restart; None keeps them
        in memory only (a restart forgets every task: clients get `taskNotFound` and generate again).
    :param result_ttl: seconds a finished task and its images are kept (a request's `ttl` shortens the
        image URLs' lifetime, never lengthens it past this).
    :param drain_timeout: seconds SIGTERM waits for queued work to finish before the process exits.
    :param fetch_grace: without `output_dir`, SIGTERM also waits (within `drain_timeout`) for results
        made in the last this-many seconds to be fetched: a polling client is that late at most.
    :param input_roots: folders `seedImage`/`maskImage` file paths may point into (default: none).
    :param lora_roots: folders `file:` LoRAs named by a request may be in; None: the `input_roots`.
        A path elsewhere gets the same answer as a missing file and is never opened.
    :param input_url_origins: origins (`https://host`, `http://host:port`) `seedImage`/`maskImage`
        URLs may be fetched from, every redirect hop included (default: none, so URL inputs are
        refused; base64, data URIs and files under `input_roots` need none).
    :param public_url: the base URL clients reach this executor at (image URLs are built on it).
    :param controlnets: ControlNet AIR id (`controlNet[].model`) -> diffusers ControlNet folder; a
        request naming another id is refused. The folders are configuration, checked at start.
    """

    models: dict[str, str]
    token: str = field(repr=False)
    devices: tuple[str, ...] = ("auto",)
    host: str = "127.0.0.1"
    port: int = 8765
    max_batch: int = 4
    output_dir: Path | None = None
    result_ttl: float = 24 * 3600.0
    drain_timeout: float = 60.0
    fetch_grace: float = 30.0
    dtype: str = "auto"
    local_files_only: bool = True
    preload: bool = True
    input_roots: tuple[str, ...] = ()
    lora_roots: tuple[str, ...] | None = None
    input_url_origins: tuple[str, ...] = ()
    public_url: str | None = None
    controlnets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--model: serve at least one model (AIR=PATH_OR_HF_ID)")
        if len(self.token) < 16:
            raise ValueError("--token-file: the token must be at least 16 characters")
        if self.fetch_grace < 0:
            raise ValueError(f"--fetch-grace must be >= 0 seconds (got {self.fetch_grace})")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1 (got {self.max_batch})")
        for air, folder in self.controlnets.items():
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(
                    f"--controlnet {air}: {folder} is not a diffusers ControlNet folder (no config.json)"
                )
        try:
            parse_origins(self.input_url_origins, "--input-url-origin")
        except ZImageError as exc:
            raise ValueError(str(exc)) from None
