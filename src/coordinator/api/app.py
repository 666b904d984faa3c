"""The coordinator's HTTP API (FastAPI) over a started cluster.

`create_app` builds the shared ApiState, installs the error handlers and the
middleware, and includes one router per API family: OpenAI's routes
(openai_routes), Anthropic's Messages (anthropic_routes), Ollama's (ollama_routes),
/generate (generate_route), /, /health, /metrics (ops_routes), and the dashboard's
assets and live events (dashboard_routes). Requests are settled in settle, errors
mapped in errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mlx_cluster.contract.config import LimitsConfig
from mlx_cluster.coordinator.api import (
    anthropic_routes,
    dashboard_routes,
    generate_route,
    ollama_routes,
    openai_routes,
    ops_routes,
)
from mlx_cluster.coordinator.api.auth import ApiKeyAuth
from mlx_cluster.coordinator.api.errors import install_error_handlers
from mlx_cluster.coordinator.api.middleware import RequestContext, RequestLimits
from mlx_cluster.coordinator.api.served_model import ServedModel
from mlx_cluster.coordinator.api.state import ApiState


def create_app(
    cluster: ServedModel,
    settings: LimitsConfig | None = None,
    cors_origins: Sequence[str] = (),
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The HTTP API over a started cluster, with the request limits of `settings`.

    With `api_keys`, every route but `GET /`, `GET /health` and the dashboard's assets
    needs one of them.
    """
    state = ApiState(cluster, settings or LimitsConfig())
    cluster.events.subscribe(state.metrics.observe)
    cluster.events.subscribe(state.live.observe)
    app = FastAPI(title="mlx-cluster", version="1")
    app.state.api = state
    install_error_handlers(app)
    if api_keys:  # innermost: refusals are logged and counted; CORS preflights pass
        app.add_middleware(ApiKeyAuth, keys=api_keys)
    app.add_middleware(RequestLimits, limits=state.limits)
    app.add_middleware(RequestContext, metrics=state.metrics)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    routers = (
        ops_routes,
        dashboard_routes,
        openai_routes,
        anthropic_routes,
        ollama_routes,
        generate_route,
    )
    for module in routers:
        app.include_router(module.router)
    return app
