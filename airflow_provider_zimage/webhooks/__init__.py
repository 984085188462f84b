"""webhooks of the Z-Image provider."""
