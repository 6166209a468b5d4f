"""Settings: one source order (CLI > env > config file), and the serve flags built from the settings."""

from __future__ import annotations


def test_settings_source_order(tmp_path, monkeypatch):
    from server.settings import CONFIG_ENV, ServerSettings

    cfg = tmp_path / "f.toml"
    cfg.write_text("port = 7001\nmax_n = 3\nmax_queue = 5\n")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    monkeypatch.setenv("FRANKLY_MAX_N", "2")
    monkeypatch.setenv("FRANKLY_API_KEYS", "a,b")
    s = ServerSettings(max_queue=9)
    assert (s.port, s.max_n, s.max_queue) == (7001, 2, 9)  # file < env < init (CLI)
    assert s.api_keys == ["a", "b"]
