"""`get_provider_info()` is read by every Airflow process through the providers manager: a field the
installed Airflow's schema refuses makes `airflow providers list` warn and drops the provider's
connection form, so it is validated against the schema that Airflow ships, on each tested version."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from airflow_provider_zimage import get_provider_info


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


def test_connection_form_offers_every_backend_the_hook_accepts() -> None:
    from typing import get_args

    from airflow_provider_zimage.operators.generate import Backend

    offered = get_provider_info()["connection-types"][0]["conn-fields"]["backend"]["schema"]["enum"]
    assert set(get_args(Backend)) <= set(offered)
