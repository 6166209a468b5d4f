"""GET /v1/models, /v1/models/{id}, /v1/directions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import require_api_key, state
from server.errors import ModelNotFound

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["models"])


def _card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "frankly"}


@router.get("/models")
async def list_models(request: Request):
    """The base model and one preset per loaded direction (``<base>+<name>``)."""
    st = state(request)
    return {"object": "list", "data": [_card(m, int(st.started)) for m in st.policy.preset_ids()]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    st = state(request)
    try:
        st.policy.parse_model(model_id)
    except Exception:
        raise ModelNotFound(f"model '{model_id}' does not exist", param="model") from None
    return _card(model_id, int(st.started))


@router.get("/directions")
async def list_directions(request: Request):
    """Loaded directions with their metadata (fingerprint, method, layers, eval figures)."""
    st = state(request)
    return {
        "object": "list",
        "data": [{"name": n, "object": "direction", **ds.public_metadata()} for n, ds in st.directions.items()],
    }
