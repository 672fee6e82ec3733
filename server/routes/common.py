"""Routes every app answers, whatever its engine: ``/v1/models`` behind the API key, and the
unauthenticated probes ``/health`` and ``/metrics`` that load balancers and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from slimserve.server.schemas import ModelCard, ModelList
from slimserve.server.state import State

router = APIRouter()
probes = APIRouter()


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=state.engine.model_name, created=state.created, root=state.model_root)])


@probes.get("/health", response_class=Response)
async def health() -> Response:
    return Response(status_code=200)


@probes.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
