"""jwt-proxy: a reverse proxy that swaps Authorization for an AWS STS web identity JWT."""

__version__ = "0.1.0"
