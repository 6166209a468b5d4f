"""The README's two commands, .ci/run and the Dockerfile must not drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
INSTALL = 'pip install torch==2.13.0 -e ".[demo]"'


def _fenced_after(heading: str) -> str:
    m = re.search(re.escape(heading) + r".*?```(?:bash|sh)?\n(.*?)```", README, re.S)
    assert m, f"README has no code block after {heading!r}"
    return m.group(1).strip()


def test_readme_run_command_installs_and_serves_demo():
    cmd = _fenced_after("## Run the server")
    assert INSTALL in cmd
    assert "frankly serve --model demo" in cmd


def test_ci_runs_exactly_the_readme_test_command():
    cmd = _fenced_after("## Run the tests")
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci == [f"exec {cmd}"]


def test_dockerfile_uses_the_readme_install_steps():
    docker = (ROOT / "Dockerfile").read_text()
    assert "pip install torch==2.13.0" in docker
    assert '-e ".[demo]"' in docker
    assert 'CMD ["frankly", "serve", "--model", "demo"]' in docker
    assert "USER frankly" in docker and "HEALTHCHECK" in docker


def test_ci_script_installs_what_the_readme_installs():
    script = (ROOT / "scripts" / "ci.sh").read_text()
    assert 'pip install --quiet torch==2.13.0 -e ".[test,demo,lora,llamacpp,search]"' in script


def test_ci_pins_the_test_tools_inside_the_test_extra():
    """scripts/ci.sh installs the test tools from the constraints file, and every pin there
    satisfies the range pyproject's extras give (so both describe one tested set)."""
    assert "-c scripts/test-constraints.txt" in (ROOT / "scripts" / "ci.sh").read_text()
    pins = {}
    for line in (ROOT / "scripts" / "test-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = spec.version
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ranges = {r.name: r.specifier for x in ("test", "lora", "llamacpp", "search") for r in map(Requirement, extras[x])}
    assert set(pins) == set(ranges)
    for name, version in pins.items():
        assert ranges[name].contains(version), f"{name}=={version} is outside the test extra's {ranges[name]}"
