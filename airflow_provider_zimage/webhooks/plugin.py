"""Kept for imports written against 0.1: the plugin now lives in `airflow_provider_zimage.plugin`."""

from __future__ import annotations

from airflow_provider_zimage.plugin import ZImagePlugin

ZImageWebhookPlugin = ZImagePlugin

__all__ = ["ZImageWebhookPlugin"]
