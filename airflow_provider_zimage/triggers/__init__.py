"""triggers of the Z-Image provider."""
