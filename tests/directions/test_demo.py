"""The demo model's shipped directions, and the files the demo fetch needs."""

from __future__ import annotations

from directions.demo import DEMO_PACKAGES, SHIPPED_DEMO, shipped_demo_paths, shipped_dir
from directions.fileformat import load_direction


def test_shipped_demo_directions_load():
    paths = shipped_demo_paths()
    assert set(paths) <= set(SHIPPED_DEMO)
    for name, path in paths.items():
        assert path.parent == shipped_dir()
        ds = load_direction(path, name=name)
        assert ds.n_layers == 24 and ds.d_model == 896  # Qwen2.5-0.5B


def test_demo_wheels_are_pinned():
    assert len(DEMO_PACKAGES) == 6 and all(p.endswith("==0.9.0") for p in DEMO_PACKAGES)
