"""``--weights auto`` (the default): int8 for the torch engine on an AVX2 CPU, float wherever else."""

from __future__ import annotations

import pytest

from directions import kernels
from server import startup
from server.settings import ModelSettings


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    monkeypatch.setattr("directions.models.resolve_device", lambda name: "cpu" if name in ("auto", "cpu") else name)


def test_auto_is_the_default_and_picks_int8_on_an_avx2_cpu(avx2):
    assert ModelSettings().weights == "auto"
    weights, why = startup.resolve_weights(ModelSettings())
    assert weights == "int8" and "AVX2" in why
    assert startup.resolve_weights(ModelSettings(dtype="float32"))[0] == "int8"


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        (dict(engine="llamacpp"), "llamacpp engine runs its own weights"),
        (dict(engine="vllm"), "vllm engine runs its own weights"),
        (dict(packed_weights=True), "--packed-weights"),
        (dict(device="cuda"), "runs on cuda"),
        (dict(dtype="bfloat16"), "--dtype bfloat16"),
    ],
)
def test_auto_is_float_where_int8_does_not_apply(avx2, settings, reason):
    weights, why = startup.resolve_weights(ModelSettings(**settings))
    assert weights == "float" and reason in why


def test_auto_is_float_on_a_cpu_without_avx2(avx2, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_supported", lambda: False)
    assert startup.resolve_weights(ModelSettings()) == (
        "float",
        "this CPU lacks AVX2 and FMA, where int8 was measured faster",
    )


@pytest.mark.parametrize("chosen", ["float", "int8"])
def test_an_explicit_choice_is_kept(monkeypatch, chosen):
    monkeypatch.setattr(kernels, "cpu_supported", lambda: False)
    assert startup.resolve_weights(ModelSettings(weights=chosen, engine="llamacpp")) == (chosen, "--weights")
