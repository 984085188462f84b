"""`get_provider_info()` is read by every Airflow process through the providers manager: a field the
installed Airflow's schema refuses makes `airflow providers list` warn and drops the provider's
connection form, so it is validated against the schema that Airflow ships, on each tested version."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

import airflow_provider_zimage
from airflow_provider_zimage import get_provider_info

PACKAGE = Path(airflow_provider_zimage.__file__).parent


def _schema() -> dict:
    return json.loads(resources.files("airflow").joinpath("provider_info.schema.json").read_text())


def test_provider_info_matches_the_installed_airflow_schema() -> None:
    jsonschema.validate(get_provider_info(), _schema())


def test_a_wrong_field_is_refused_by_the_same_check() -> None:
    """The validation above is not vacuous: the schema does refuse what Airflow cannot read."""
    info = get_provider_info()
    info["connection-types"] = [{"connection-type": "zimage"}]  # no hook-class-name
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(info, _schema())


def test_every_config_option_the_code_reads_is_declared() -> None:
    """`airflow config list` and the docs show only declared options: one read in the code but missing
    from `config` is a setting users cannot discover."""
    pattern = re.compile(r"""(?:conf\.get\w*|_conf_get|_conf_value)\(\s*"zimage",\s*"(\w+)\"""")
    read = {m for path in PACKAGE.rglob("*.py") for m in pattern.findall(path.read_text())}
    declared = set(get_provider_info()["config"]["zimage"]["options"])
    assert read, "no [zimage] option found in the code: the pattern is out of date"
    assert read <= declared, f"read but not declared: {sorted(read - declared)}"


def test_connection_form_offers_every_backend_the_hook_accepts() -> None:
    from typing import get_args

    from airflow_provider_zimage.operators.generate import Backend

    offered = get_provider_info()["connection-types"][0]["conn-fields"]["backend"]["schema"]["enum"]
    assert set(get_args(Backend)) <= set(offered)
