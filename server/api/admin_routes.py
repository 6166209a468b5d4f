"""POST /v1/bake and GET /v1/bake/{job_id} (admin key required; off when none is set)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.deps import require_admin, state
from server.errors import APIError, InvalidRequest, NotFound
from server.protocol import BakeRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], tags=["admin"])


def _job(job) -> dict:
    d = job.to_dict() if hasattr(job, "to_dict") else dict(vars(job))
    d["object"] = "bake.job"
    return d


@router.post("/bake", status_code=202)
async def bake(body: BakeRequest, request: Request):
    """Bake the given strengths into a copy of the weights (or, with ``format: lora``, export LoRA adapters)
    under the bake directory, by name."""
    st = state(request)
    steering = st.policy.parse_body(body.steering, for_engine=False)
    if not steering:
        raise InvalidRequest("steering must name at least one direction", param="steering")
    if any(d.when == "auto" for d in steering.values()):
        raise InvalidRequest("conditional steering cannot be baked into weights", param="steering")
    strengths = {n: d.strength for n, d in steering.items()}
    from directions.bake import BakeBusyError, BakeError, BakeExistsError

    if st.bake_jobs is None:
        raise NotFound("baking is not available in this build", param=None)
    try:
        job = st.bake_jobs.start(body.name, strengths, overwrite=body.overwrite, format=body.format)
    except BakeError as e:
        err = InvalidRequest(str(e), param=e.param, code=e.code)
        if isinstance(e, BakeExistsError):
            err.status = 409
        elif isinstance(e, BakeBusyError):
            err.status, err.type, err.headers = 429, "rate_limit_error", {"Retry-After": "30"}
        raise err from None
    return JSONResponse(_job(job), status_code=202, headers={"Location": f"/v1/bake/{job.id}"})


@router.get("/bake")
async def list_bakes(request: Request):
    return {"object": "list", "data": [_job(j) for j in state(request).bake_jobs.list()]}


@router.get("/bake/{job_id}")
async def get_bake(job_id: str, request: Request):
    job = state(request).bake_jobs.get(job_id)
    if job is None:
        raise NotFound(f"no bake job '{job_id}'", param="job_id")
    return _job(job)


__all__ = ["APIError", "router"]
