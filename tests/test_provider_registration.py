"""The plugin is registered the way Apache providers register theirs, and Airflow sees it exactly once.

Airflow has two ways in: `get_provider_info()["plugins"]`, read by the providers manager (and loaded
by the plugins manager only with `[core] lazy_discover_providers = False`), and the `airflow.plugins`
entry point. A user must get the same plugin (same views, same app) whichever setting their
deployment has, listed once by `airflow plugins`, never "already registered, skipping".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage import get_provider_info

PLUGIN_CLASS = "airflow_provider_zimage.plugin.ZImagePlugin"
AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow_plugins(tmp_path: Path, *, lazy_discover_providers: bool) -> list[dict[str, Any]]:
    """What `airflow plugins --output json` lists, in a fresh Airflow home."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(tmp_path / "plugins"),
        "AIRFLOW__CORE__LAZY_DISCOVER_PROVIDERS": str(lazy_discover_providers),
    }
    done = subprocess.run(
        [AIRFLOW, "plugins", "--output", "json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already registered" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_provider_info_names_the_plugin_class_airflow_loads() -> None:
    from airflow_provider_zimage.plugin import ZImagePlugin

    declared = get_provider_info()["plugins"]
    assert declared == [{"name": "zimage", "plugin-class": PLUGIN_CLASS}]
    assert ZImagePlugin.name == declared[0]["name"]


def test_the_providers_manager_lists_the_plugin() -> None:
    from airflow.providers_manager import ProvidersManager

    mine = [p for p in ProvidersManager().plugins if p.provider_name == "airflow-provider-zimage"]
    assert [(p.name, p.plugin_class) for p in mine] == [("zimage", PLUGIN_CLASS)]


@pytest.mark.parametrize("lazy_discover_providers", [True, False], ids=["entry-point", "providers-manager"])
def test_airflow_plugins_lists_the_same_plugin_once_either_way(
    tmp_path: Path, lazy_discover_providers: bool
) -> None:
    from airflow_provider_zimage.plugin import ZImagePlugin

    listed = airflow_plugins(tmp_path, lazy_discover_providers=lazy_discover_providers)
    mine = [p for p in listed if p["name"] == "zimage"]
    assert len(mine) == 1, [p["name"] for p in listed]
    plugin = mine[0]
    # The same views and the same app as the class the provider info names, whichever way it came in.
    assert plugin["external_views"] == ZImagePlugin.external_views
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/zimage"]
    source = plugin["source"] or ""
    if lazy_discover_providers:
        assert "airflow.plugins" in source and "ENTRY_POINT_PLUGIN" in source
    else:
        assert "airflow.plugins" not in source  # loaded through get_provider_info(), not the entry point


def test_every_zimage_option_the_code_reads_is_declared_for_airflow_config() -> None:
    """`airflow config list` and the providers manager show what a deployment can set; an option
    declared but never read would be a setting that silently does nothing.

    Every read of `[zimage]` goes through `config._option` (tests/test_architecture.py checks that no
    other module reads the section), so its calls are the options the code reads.
    """
    source = (Path(__file__).resolve().parents[1] / "airflow_provider_zimage" / "config.py").read_text()
    read = set(re.findall(r"""\b_option\(\s*["'](\w+)["']\s*\)""", source))
    declared = set(get_provider_info()["config"]["zimage"]["options"])
    assert read, "no [zimage] option found in config.py: the pattern no longer matches"
    assert read <= declared, f"read but not declared: {sorted(read - declared)}"
    assert declared <= read, f"declared but never read: {sorted(declared - read)}"


def test_provider_info_lists_every_operator_and_trigger_module() -> None:
    info = get_provider_info()
    operators = {m for entry in info["operators"] for m in entry["python-modules"]}
    triggers = {m for entry in info["triggers"] for m in entry["python-modules"]}
    package = Path(__file__).resolve().parents[1] / "airflow_provider_zimage"
    modules = {
        f"airflow_provider_zimage.{kind}.{p.stem}"
        for kind in ("operators", "triggers")
        for p in (package / kind).glob("*.py")
        if p.stem != "__init__"
    }
    # polling.py is the triggers' shared poller and base.py their shared serialization: no trigger in either.
    assert {m for m in modules if ".operators." in m} == operators
    assert {m for m in modules if ".triggers." in m} - {
        "airflow_provider_zimage.triggers.polling",
        "airflow_provider_zimage.triggers.base",
    } == triggers
