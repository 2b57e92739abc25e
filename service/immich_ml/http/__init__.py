"""The HTTP edge: the aiohttp application, its routes, client allowlist/TLS and Prometheus metrics."""
