"""Deployment: the portable quantized checkpoint."""
