"""Parsing per-request steering: the body field and model-id suffixes.

Model ids: ``<base>``, ``<base>+refusal`` (strength 1), ``<base>+refusal:0.5``,
``<base>+refusal@auto`` / ``<base>+refusal:0.8@auto`` (conditional), several
allowed (``qwen-demo+refusal+slop:0.5``). The body field ``steering`` wins
over suffixes, direction by direction.
"""

from __future__ import annotations

import json
from typing import Any

from directions.fileformat import DirectionSet
from directions.strengths import WHEN, DirectionRequest, StrengthError, check_strength
from server.engine.protocol import EngineCapabilities
from server.errors import InvalidRequest, ModelNotFound


class SteeringPolicy:
    """What the served model allows: its id, its directions, the limits, and what its engine can do."""

    def __init__(
        self,
        base_id: str,
        directions: dict[str, DirectionSet],
        max_abs_strength: float,
        max_directions: int,
        capabilities: EngineCapabilities | None = None,
    ):
        self.base_id = base_id
        self.directions = directions
        self.max_abs_strength = max_abs_strength
        self.max_directions = max_directions
        self.capabilities = capabilities  # None: no engine limits (unit tests of the parsing)

    @property
    def conditional_ok(self) -> bool:
        return self.capabilities is None or self.capabilities.supports_conditional

    # ---- model ids ----------------------------------------------------------
    def parse_model(self, model: str) -> dict[str, DirectionRequest]:
        """The steering a model id asks for; ModelNotFound for another base or an unknown direction."""
        base, *suffixes = model.split("+")
        if base != self.base_id:
            raise ModelNotFound(f"model '{model}' does not exist; this server serves '{self.base_id}'", param="model")
        out: dict[str, DirectionRequest] = {}
        for suf in suffixes:
            name, when = suf, "always"
            if "@" in name:
                name, when = name.split("@", 1)
            strength: float | None = None
            if ":" in name:
                name, raw = name.split(":", 1)
                try:
                    strength = float(raw)
                except ValueError:
                    raise InvalidRequest(f"bad strength '{raw}' in model id '{model}'", param="model") from None
            if name not in self.directions:
                raise ModelNotFound(
                    f"model '{model}': unknown direction '{name}' (loaded: {', '.join(self.directions) or 'none'})",
                    param="model",
                )
            if strength is None:
                strength = self._default_strength(name, when)
            out[name] = self._check(name, strength, when, param="model")
        return out

    def preset_ids(self) -> list[str]:
        ids = [self.base_id]
        for name, ds in self.directions.items():
            if self.runs({name: 1.0}):
                ids.append(f"{self.base_id}+{name}")
            if ds.has_condition and self.conditional_ok:
                ids.append(f"{self.base_id}+{name}@auto")
        return ids

    # ---- body field -----------------------------------------------------------
    def parse_body(self, value: Any, for_engine: bool = True) -> dict[str, DirectionRequest]:
        """The steering of the body field: an object (or the same as a JSON string) of name -> spec.

        ``for_engine=False`` skips the engine's capability check (a bake or export runs no engine)."""
        if value is None:
            return {}
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise InvalidRequest("'steering' is a string but not a JSON object", param="steering") from None
        if not isinstance(value, dict):
            raise InvalidRequest("'steering' must be an object mapping direction names to strengths", param="steering")
        out = {}
        for name, spec in value.items():
            param = f"steering.{name}"
            if name not in self.directions:
                raise InvalidRequest(
                    f"unknown direction '{name}' (loaded: {', '.join(self.directions) or 'none'})",
                    param=param,
                    code="unknown_direction",
                )
            when = "always"
            if isinstance(spec, dict):
                extra = set(spec) - {"strength", "when"}
                if extra:
                    raise InvalidRequest(f"unknown keys {sorted(extra)} in '{param}'", param=param)
                when = spec.get("when", "always")
                spec = spec["strength"] if "strength" in spec else self._default_strength(name, when)
            out[name] = self._check(name, spec, when, param=param, for_engine=for_engine)
        return out

    def resolve(self, model: str, body_value: Any) -> dict[str, DirectionRequest]:
        """Model-id suffixes, then the body field over them direction by direction, within the limits."""
        merged = {**self.parse_model(model), **self.parse_body(body_value)}
        if len(merged) > self.max_directions:
            raise InvalidRequest(f"at most {self.max_directions} directions per request", param="steering")
        self._check_combination(merged)
        return merged

    def runs(self, strengths: dict[str, float]) -> bool:
        """Whether the engine runs these strengths (engines with exported adapters run only those)."""
        combos = self.capabilities.steering_combinations if self.capabilities is not None else None
        key = tuple(sorted((n, float(s)) for n, s in strengths.items() if s != 0))
        return combos is None or not key or key in combos

    def _check_combination(self, steering: dict[str, DirectionRequest]) -> None:
        if self.runs({n: d.strength for n, d in steering.items()}):
            return
        asked = "+".join(f"{n}={d.strength:g}" for n, d in sorted(steering.items()) if d.strength != 0)
        exported = ", ".join("+".join(f"{n}={s:g}" for n, s in c) for c in self.capabilities.steering_combinations)
        raise InvalidRequest(
            f"the {self.capabilities.name} engine runs only the steering it exported adapters for "
            f"({exported or 'none'}); {asked} is not among them (restart with that strength or combination exported)",
            param="steering",
            code="unsupported_by_engine",
        )

    def _default_strength(self, name: str, when: Any) -> float:
        """A request's strength when it names none: the direction file's ``auto_strength``
        for ``when: auto`` (clamped to the server's limit), else 1."""
        if when != "auto":
            return 1.0
        return min(self.directions[name].auto_strength, self.max_abs_strength)

    def _check(self, name: str, strength: Any, when: Any, param: str, for_engine: bool = True) -> DirectionRequest:
        try:
            s = check_strength(name, strength, self.max_abs_strength)
        except StrengthError as e:
            raise InvalidRequest(str(e), param=param) from None
        if when not in WHEN:
            raise InvalidRequest(f"'when' for '{name}' must be one of {WHEN}", param=param)
        if when == "auto" and for_engine and not self.conditional_ok:
            raise InvalidRequest(
                f"the {self.capabilities.name} engine does not support conditional steering (when: auto); "
                "use when='always'",
                param=param,
                code="unsupported_by_engine",
            )
        if when == "auto" and not self.directions[name].has_condition:
            raise InvalidRequest(f"direction '{name}' has no calibrated condition; use when='always'", param=param)
        return DirectionRequest(strength=s, when=when)


def steering_header(steering: dict[str, DirectionRequest]) -> str:
    """``X-Steering`` value: ``refusal=1.0,slop=0.5@auto`` (requested strengths), or ``none``."""
    parts = [
        f"{n}={d.strength:g}" + ("@auto" if d.when == "auto" else "") for n, d in steering.items() if d.strength != 0
    ]
    return ",".join(parts) or "none"
