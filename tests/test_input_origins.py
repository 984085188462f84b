"""Input images given as URLs are fetched only from allowed origins (issue 19).

`inputs.seedImage` / `inputs.maskImage` are request data: templated table rows in-process, a payload any
token holder POSTs to the executor. A URL in them must not make the worker or the GPU host fetch an
internal address (cloud metadata, a localhost admin port), and the answer must not tell the caller
whether such an address answered. These run the in-process backend's planner (it decodes the inputs and
loads no model) against a real loopback HTTP server that counts what it was asked for.
"""

from __future__ import annotations

import base64
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_zimage.exceptions import ZImageTransientError, ZImageValidationError
from airflow_provider_zimage.local import LocalZImageExecutor
from airflow_provider_zimage.models import ImageInferenceRequest
from tests.image_server import ImageServer, png_bytes

TURBO = "runware:z-image@turbo"
MiB = 2**20


@pytest.fixture
def images() -> Iterator[ImageServer]:
    with ImageServer(huge_bytes=50 * MiB + 1) as server:
        yield server


@pytest.fixture
def elsewhere() -> Iterator[ImageServer]:
    """Another service on the same host: what an attacker would point a URL or a redirect at."""
    with ImageServer() as server:
        yield server


@pytest.fixture(autouse=True)
def no_configured_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", raising=False)


def request(**inputs: str) -> ImageInferenceRequest:
    return ImageInferenceRequest.build(
        model=TURBO, positivePrompt="a lighthouse", width=128, height=128, steps=2, inputs=inputs
    )


def plan(req: ImageInferenceRequest, **kwargs: Any) -> Any:
    return LocalZImageExecutor(None, input_roots=[], **kwargs).plan(req)


def refusal(req: ImageInferenceRequest, **kwargs: Any) -> ZImageValidationError | ZImageTransientError:
    with pytest.raises((ZImageValidationError, ZImageTransientError)) as caught:
        plan(req, **kwargs)
    return caught.value


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_by_default_a_seed_image_url_is_refused_naming_the_parameter_and_the_option_and_nothing_is_fetched(
    images: ImageServer,
) -> None:
    error = refusal(request(seedImage=images.url("/seed.png")))
    assert isinstance(error, ZImageValidationError) and error.parameters == ["inputs.seedImage"]
    assert "local_input_origins" in str(error) and "--input-url-origin" in str(error)
    assert images.hits == []


def test_a_mask_image_url_on_another_port_of_an_allowed_host_is_refused_and_nothing_is_fetched(
    images: ImageServer, elsewhere: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", images.origin)
    seed = base64.b64encode(png_bytes()).decode()
    error = refusal(request(seedImage=seed, maskImage=elsewhere.url("/seed.png")))
    assert error.parameters == ["inputs.maskImage"]  # type: ignore[union-attr]
    assert elsewhere.hits == []


@pytest.mark.parametrize("location", ["absolute", "scheme-relative"])
def test_a_redirect_from_an_allowed_origin_to_another_is_refused(
    images: ImageServer, elsewhere: ImageServer, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", images.origin)
    target = elsewhere.url("/seed.png")
    images.redirects["/moved.png"] = target if location == "absolute" else target.removeprefix("http:")
    error = refusal(request(seedImage=images.url("/moved.png")))
    assert isinstance(error, ZImageValidationError) and error.parameters == ["inputs.seedImage"]
    assert images.hits == ["/moved.png"]
    assert elsewhere.hits == [], "the hop off the allowed origin was never fetched"


def test_an_allowed_origins_image_is_used_and_a_redirect_within_it_is_followed(
    images: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", f"images.example.com, {images.origin}")
    images.redirects["/old.png"] = "/seed.png"
    planned = plan(request(seedImage=images.url("/old.png")))
    assert planned.kind == "image-to-image"
    assert planned.seed_image.getpixel((0, 0)) == (200, 40, 90)
    assert images.hits == ["/old.png", "/seed.png"]


def test_origins_given_to_the_executor_object_replace_the_configured_ones(
    images: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", "images.example.com")
    assert plan(request(seedImage=images.url("/seed.png")), input_origins=[images.origin]).seed_image
    assert images.hits == ["/seed.png"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_an_oversized_input_is_refused_naming_the_parameter(
    monkeypatch: pytest.MonkeyPatch, declared: bool
) -> None:
    with ImageServer(huge_bytes=50 * MiB + 1, declare_length=declared) as images:
        monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", images.origin)
        error = refusal(request(seedImage=images.url("/huge.png")))
    assert isinstance(error, ZImageValidationError) and error.parameters == ["inputs.seedImage"]
    assert "larger than 50 MiB" in str(error)


def test_a_missing_image_and_a_closed_port_read_like_a_refused_origin_and_the_log_says_which(
    images: ImageServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever wrote the URL learns "not fetched", never whether something listens there; the worker's
    log keeps the reason for the operator, without the URL's query (a presigned credential)."""
    closed = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", f"{images.origin}, {closed}")
    caplog.set_level(logging.WARNING, logger="airflow_provider_zimage")
    answers = {
        name: refusal(request(seedImage=url))
        for name, url in {
            "refused": "http://169.254.169.254/latest/meta-data/?token=s3cr3t",
            "missing": images.url("/nothing-here.png?token=s3cr3t"),
            "closed": f"{closed}/seed.png?token=s3cr3t",
        }.items()
    }
    assert str(answers["refused"]) == str(answers["missing"]) == str(answers["closed"])
    assert "404" not in str(answers["missing"]) and "refused" not in str(answers["closed"]).lower()
    assert isinstance(answers["closed"], ZImageTransientError), "in-process, Airflow's retries still apply"
    assert "404" in caplog.text and "s3cr3t" not in caplog.text and "s3cr3t" not in str(answers)


@pytest.mark.parametrize("entry", ["ftp://images.example.com", "https://images.example.com/path", "a b"])
def test_an_unreadable_origin_entry_is_refused_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ORIGINS", entry)
    with pytest.raises(Exception, match=r"\[zimage\] local_input_origins"):
        plan(request(seedImage="http://images.example.com/seed.png"))


def test_base64_and_data_uri_inputs_need_no_origin(images: ImageServer) -> None:
    data = base64.b64encode(png_bytes()).decode()
    assert plan(request(seedImage=data)).seed_image
    assert plan(request(seedImage=f"data:image/png;base64,{data}")).seed_image
    assert images.hits == []
