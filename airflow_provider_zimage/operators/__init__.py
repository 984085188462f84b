"""operators of the Z-Image provider."""
