"""The package's version, in a module of its own so that `get_provider_info` can read it without
importing the package root (which imports `get_provider_info`): no import circle."""

__version__ = "0.1.0"
