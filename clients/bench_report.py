"""Statistics and output of ``clients/bench.py``: percentiles, the summary of a load run and of
a join-latency probe (JSON-ready dicts), and the markdown table rows."""

from __future__ import annotations

import statistics
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clients.bench_load import RequestResult


# ---- statistics ---------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def summarize(results: list[RequestResult], wall: float, **meta) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    rates = [r.decode_rate for r in ok if r.decode_rate is not None]
    tokens = sum(r.tokens for r in results)
    sources = {"usage" if r.usage_tokens is not None else "chunks" for r in results if r.tokens}
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    by_body: dict[int, dict] = {}
    for bi in sorted({r.body_index for r in results}):
        rs = [r for r in ok if r.body_index == bi]
        br = [r.decode_rate for r in rs if r.decode_rate is not None]
        by_body[bi] = {
            "requests": len(rs),
            "tokens": sum(r.tokens for r in rs),
            "per_stream_tok_s": _r(statistics.mean(br)) if br else None,
            "ttft_p50_s": _r(pct([r.ttft for r in rs if r.ttft is not None], 50)),
        }
    return {
        **meta,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "tokens": tokens,
        "tokens_source": "+".join(sorted(sources)) or "none",
        "tokens_per_request_mean": _r(tokens / len(results), 1) if results else None,
        "content_chunks": sum(r.content_chunks for r in results),
        "prompt_tokens_mean": _r(statistics.mean(pt), 1)
        if (pt := [r.prompt_tokens for r in ok if r.prompt_tokens])
        else None,
        "finish_reasons": finish,
        "wall_s": _r(wall),
        "agg_tok_s": _r(tokens / wall if wall > 0 else None, 2),
        "per_stream_tok_s": _r(statistics.mean(rates) if rates else None, 2),
        "per_stream_tok_s_p50": _r(pct(rates, 50), 2),
        "ttft_p50_s": _r(pct(ttfts, 50)),
        "ttft_p95_s": _r(pct(ttfts, 95)),
        "itl_p50_s": _r(pct(itls, 50), 4),
        "itl_p95_s": _r(pct(itls, 95), 4),
        "itl_max_s": _r(max(itls) if itls else None, 4),
        "e2e_p50_s": _r(pct([r.t_end - r.t_start for r in ok if r.t_end], 50)),
        "by_body": by_body,
        "per_request": [
            {
                "prompt": r.prompt_index,
                "body": r.body_index,
                "tokens": r.tokens,
                "finish": r.finish_reason,
                "ttft_s": _r(r.ttft),
                "e2e_s": _r(r.t_end - r.t_start if r.t_end else None),
                "error": r.error,
            }
            for r in results
        ],
    }


# ---- a join-latency probe ------------------------------------------------------------
def long_stream_report(long: RequestResult, short: RequestResult) -> dict:
    """The long stream of one join: its own timings, and whether it was still running when the short one began."""
    # The long stream's largest gap around the join is what it pays for the newcomer's prefill.
    near = [b - a for a, b in pairwise(long.chunk_times) if short.t_start <= b <= short.t_first + 1.0]
    return {
        "ttft_s": _r(long.ttft),
        "tokens": long.tokens,
        "still_running_at_short_first_token": bool(long.chunk_times and long.chunk_times[-1] > short.t_first),
        "itl_p50_s": _r(pct(long.itls, 50), 4),
        "max_gap_near_join_s": _r(max(near) if near else None, 4),
    }


def join_report(
    alone: list[float], joined: list[float], long_info: list[dict], *, long_tokens: int, delay: float, errors: list
) -> dict:
    """The short request's TTFT alone and joined (medians and every run), and what the join cost."""
    out = {
        "short_ttft_alone_s": _r(statistics.median(alone)),
        "short_ttft_alone_all_s": [_r(x) for x in alone],
        "short_ttft_joined_s": _r(statistics.median(joined)) if joined else None,
        "short_ttft_joined_all_s": [_r(x) for x in joined],
        "long_stream": long_info,
        "long_tokens": long_tokens,
        "delay_s": delay,
        "errors": errors,
    }
    if joined:
        out["join_penalty_s"] = _r(out["short_ttft_joined_s"] - out["short_ttft_alone_s"])
    return out


# ---- output --------------------------------------------------------------------------
COLUMNS = [
    ("label", "run"),
    ("streams", "streams"),
    ("requests", "reqs"),
    ("errors", "err"),
    ("tokens", "gen tokens"),
    ("wall_s", "wall s"),
    ("agg_tok_s", "agg tok/s"),
    ("per_stream_tok_s", "per-stream tok/s"),
    ("ttft_p50_s", "TTFT p50 s"),
    ("ttft_p95_s", "TTFT p95 s"),
    ("itl_p50_s", "ITL p50 s"),
    ("itl_p95_s", "ITL p95 s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("other_cores", "other CPU"),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table_header() -> str:
    return "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"


def table_row(s: dict) -> str:
    return "| " + " | ".join(_fmt(s.get(k)) for k, _ in COLUMNS) + " |"
