"""Unit tests of one concern package's own rules (airflow_provider_zimage/storage/)."""
