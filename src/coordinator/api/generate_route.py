"""`POST /generate`: a prompt in; text, usage and timings out (whole or streamed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from mlx_cluster.coordinator.api import openai_format as fmt
from mlx_cluster.coordinator.api.responses import answer
from mlx_cluster.coordinator.api.schemas import GenerateRequest
from mlx_cluster.coordinator.api.settle import settle_generate
from mlx_cluster.coordinator.api.state import State

router = APIRouter()


@router.post("/generate", response_model=None)
async def generate(request: GenerateRequest, state: State) -> dict[str, Any] | StreamingResponse:
    prepared = await settle_generate(request, state.cluster, state.limits)
    return await answer(
        [state.generate(prepared)],
        request.stream,
        lambda choices: fmt.generate_response(choices[0]),
        lambda chunk, first: [fmt.generate_chunk(chunk)],
    )
