"""The offline test kit: a Runware-compatible server (`runware_server`), a tiny random-weight Z-Image
checkpoint (`tiny_model`) and the pytest plugin that hands both to tests (`pytest_plugin`)."""
