"""Seawall sidecar: a circuit-breaking reverse proxy for service dependencies."""

__version__ = "0.1.0"
