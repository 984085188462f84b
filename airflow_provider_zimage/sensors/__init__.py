"""sensors of the Z-Image provider."""
