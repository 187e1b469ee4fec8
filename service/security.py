"""Optional bearer-token auth and CORS, as ASGI wrappers around every route (``service.app`` applies them once).

Both are off unless configured: ``SCS_API_KEY`` turns on auth (constant-time comparison; the health probes
and the API docs stay open, everything else answers 401 with the error shape), ``SCS_CORS_ORIGINS`` (comma
separated, or ``*``) turns on Starlette's CORS middleware. No endpoint changes state, so auth guards reads:
the classifier itself, the model summary and the metrics.
"""

from __future__ import annotations

import hmac

from starlette.middleware.cors import CORSMiddleware

from .errors import unauthorized
from .hot_route import respond

# Probes must work without credentials (kubelet, load balancers); the docs describe the API, not its data.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect",
                        "/redoc", "/openapi.json"})


class BearerAuth:
    """Pure ASGI middleware: requests outside ``OPEN_PATHS`` need ``Authorization: Bearer <api_key>``.
    CORS preflights (OPTIONS) pass: browsers never send credentials on them."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            if not hmac.compare_digest(given, self.expected):
                error = unauthorized()
                await respond(send, error.status, error.body(), headers=error.headers)
                return
        await self.app(scope, receive, send)


def cors_origins(value: str) -> list[str]:
    return [origin.strip() for origin in value.split(",") if origin.strip()]


def secure(app, settings):
    """``app`` behind auth (when ``settings.api_key``) and CORS (when ``settings.cors_origins``)."""
    if settings.api_key is not None:
        app = BearerAuth(app, settings.api_key.get_secret_value())
    origins = cors_origins(settings.cors_origins)
    if origins:
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                             expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    return app
