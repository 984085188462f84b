"""Issue 19, hole 2: image downloads reach only allowed origins (scheme, host and port), redirects too.

A result's `imageURL` comes from the API's answer or a webhook; with host-only matching it could point
a worker at any port of the API host (an executor's admin port, a proxy's internal listener). These
tests run two real loopback servers: the "API" the connection names, and another port of the same host.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_zimage.exceptions import ZImagePermanentError
from airflow_provider_zimage.hooks import runware
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.runware.models import ImageResult
from airflow_provider_zimage.runware.protocol import RetryPolicy

IMAGE = b"\x89PNG\r\n\x1a\n not really a picture"
FAST = RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.02)
RUNWARE = ConnectionSettings(base_url="https://api.runware.ai/v1", api_key="k", retry=FAST)


class LoopbackServer:
    """A plain HTTP server on 127.0.0.1: `/img.png` is an image, `redirects` maps a path to a Location."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.redirects: dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(IMAGE)))
                self.end_headers()
                self.wfile.write(IMAGE)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.stop()


@pytest.fixture
def other_port() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_configured_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", raising=False)


def hook_for(api: LoopbackServer) -> ZImageHook:
    return ZImageHook(settings=ConnectionSettings(base_url=f"{api.origin}/v1", api_key="k", retry=FAST))


def result(url: str) -> ImageResult:
    return ImageResult.from_wire(
        {"taskUUID": "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10", "imageUUID": "x", "imageURL": url}
    )


def download_sync(hook: ZImageHook, res: ImageResult) -> bytes:
    return hook.download(res)


def download_async(hook: ZImageHook, res: ImageResult) -> bytes:
    return asyncio.run(hook.adownload(res))


both_paths = pytest.mark.parametrize("download", [download_sync, download_async], ids=["sync", "async"])
Download = Callable[[ZImageHook, ImageResult], bytes]


# -- over the network ----------------------------------------------------------------------------------


@both_paths
def test_an_image_url_on_another_port_of_the_api_host_is_refused_and_nothing_is_fetched(
    download: Download, api: LoopbackServer, other_port: LoopbackServer
) -> None:
    with pytest.raises(ZImagePermanentError, match=f"127.0.0.1:{other_port.port}"):
        download(hook_for(api), result(f"{other_port.origin}/img.png"))
    assert other_port.hits == []


@both_paths
@pytest.mark.parametrize("location", ["absolute", "scheme-relative"])
def test_a_redirect_from_the_api_port_to_another_port_is_refused(
    download: Download, location: str, api: LoopbackServer, other_port: LoopbackServer
) -> None:
    target = f"{other_port.origin}/img.png"
    api.redirects["/img.png"] = target if location == "absolute" else target.removeprefix("http:")
    with pytest.raises(ZImagePermanentError, match=f"127.0.0.1:{other_port.port}"):
        download(hook_for(api), result(f"{api.origin}/img.png"))
    assert api.hits == ["/img.png"]
    assert other_port.hits == []


@both_paths
def test_an_allowed_host_with_a_named_port_is_fetched(
    download: Download, other_port: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", f"images.example.com, {other_port.origin}")
    assert download(ZImageHook(settings=RUNWARE), result(f"{other_port.origin}/img.png")) == IMAGE
    assert other_port.hits == ["/img.png"]


@both_paths
def test_a_bare_host_entry_does_not_open_the_other_ports_of_that_host(
    download: Download, api: LoopbackServer, other_port: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", "127.0.0.1")
    with pytest.raises(ZImagePermanentError, match="allowed_image_hosts"):
        download(hook_for(api), result(f"{other_port.origin}/img.png"))
    assert other_port.hits == []


@both_paths
def test_a_relative_redirect_within_the_api_origin_is_followed(
    download: Download, api: LoopbackServer
) -> None:
    api.redirects["/old.png"] = "/img.png"
    assert download(hook_for(api), result(f"{api.origin}/old.png")) == IMAGE
    assert api.hits == ["/old.png", "/img.png"]


@both_paths
def test_a_redirect_loop_on_an_allowed_origin_fails_instead_of_storing_the_redirect(
    download: Download, api: LoopbackServer
) -> None:
    api.redirects["/loop.png"] = "/loop.png"
    with pytest.raises(ZImagePermanentError, match="redirects"):
        download(hook_for(api), result(f"{api.origin}/loop.png"))


# -- what an origin is -----------------------------------------------------------------------------------


def refused(url: str, settings: ConnectionSettings = RUNWARE) -> str:
    with pytest.raises(ZImagePermanentError) as info:
        ZImageHook(settings=settings).download(result(url))
    return str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://im.runware.ai:8443/x.png",  # another port of Runware's image host
        "http://im.runware.ai/x.png",  # plain HTTP to an https-only origin
        "https://api.runware.ai:444/x.png",  # another port of the API host
        "ftp://im.runware.ai/x.png",
        "https://im.runware.ai.evil.example/x.png",
    ],
)
def test_an_image_url_off_the_default_origins_is_refused(url: str) -> None:
    assert "allowed_image_hosts" in refused(url)


def test_default_and_explicit_ports_and_any_case_name_the_same_origin() -> None:
    origins = runware.allowed_image_origins(RUNWARE)
    for url in ("https://im.runware.ai:443/x.png", "HTTPS://IM.Runware.AI/x.png", "https://api.runware.ai/x"):
        assert runware.check_image_url(url, origins)


def test_a_url_with_userinfo_is_refused_without_repeating_the_password() -> None:
    message = refused("https://user:hunter2@im.runware.ai/x.png")
    assert "userinfo" in message and "hunter2" not in message


def test_a_refusal_names_the_origin_but_not_the_query() -> None:
    message = refused("https://evil.example:8443/x.png?X-Amz-Signature=sekrit")
    assert "https://evil.example:8443" in message and "sekrit" not in message


def test_configured_entries_name_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS",
        "Images.Example.com, cdn.example.com:8443, http://minio.internal:9000, [::1]:8080, http://[::1], "
        "http://zimage_executor:8765",
    )
    origins = {str(o) for o in runware.allowed_image_origins(RUNWARE)}
    assert origins == {
        "https://im.runware.ai:443",
        "https://api.runware.ai:443",
        "https://images.example.com:443",
        "https://cdn.example.com:8443",
        "http://minio.internal:9000",
        "https://[::1]:8080",
        "http://[::1]:80",
        "http://zimage_executor:8765",
    }


def test_ipv6_literals_compare_by_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", "http://[::1]:8080")
    origins = runware.allowed_image_origins(RUNWARE)
    assert runware.check_image_url("http://[0:0:0:0:0:0:0:1]:8080/x.png", origins)
    with pytest.raises(ZImagePermanentError):
        runware.check_image_url("http://[::1]:8081/x.png", origins)


@pytest.mark.parametrize(
    "entry",
    ["images.example.com/path", "ftp://images.example.com", "user@images.example.com", "host:notaport"],
)
def test_a_malformed_allowed_image_hosts_entry_is_named(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", entry)
    with pytest.raises(ZImagePermanentError, match=r"\[zimage\] allowed_image_hosts") as info:
        runware.allowed_image_origins(RUNWARE)
    assert entry in str(info.value)
