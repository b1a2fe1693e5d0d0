"""Operating the relay: the admin API (list and revoke tunnels), Prometheus metrics, the log
output, TLS contexts for the listeners, and the helper that serves a small aiohttp app."""
