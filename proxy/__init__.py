"""idempotency-proxy: a reverse proxy that makes retries safe for APIs never built for them."""

__version__ = "0.1.0"
