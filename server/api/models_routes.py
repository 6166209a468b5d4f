"""GET /v1/models, /v1/models/{id}, /v1/directions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import require_api_key, state
from server.errors import APIError, ModelNotFound
from server.responses import DirectionCard, DirectionList, ModelCard, ModelList

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The base model and one preset per loaded direction (``<base>+<name>``)."""
    st = state(request)
    return ModelList(data=[ModelCard(id=m, created=int(st.started)) for m in st.policy.preset_ids()])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    st = state(request)
    try:
        st.policy.parse_model(model_id)
    except APIError:
        raise ModelNotFound(f"model '{model_id}' does not exist", param="model") from None
    return ModelCard(id=model_id, created=int(st.started))


@router.get("/directions", response_model=DirectionList)
async def list_directions(request: Request) -> DirectionList:
    """Loaded directions with their metadata (fingerprint, method, layers, eval figures)."""
    st = state(request)
    cards = [DirectionCard.model_validate({"name": n, **ds.public_metadata()}) for n, ds in st.directions.items()]
    return DirectionList(data=cards)
