"""hooks of the Z-Image provider."""
