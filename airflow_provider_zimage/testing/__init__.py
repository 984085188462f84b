"""Offline helpers (a tiny random Z-Image checkpoint) for tests, benchmarks and the demo."""
