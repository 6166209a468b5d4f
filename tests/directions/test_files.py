"""Line readers, JSON lines, sha256 of files, the cache directory."""

from __future__ import annotations

import hashlib

from directions.files import cache_root, read_jsonl, read_lines, sha256_file


def test_read_lines_strips_and_skips_blank_lines(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("  one \n\n two\n   \nthree", encoding="utf-8")
    assert read_lines(p) == ["one", "two", "three"]


def test_read_jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    p = tmp_path / "b.bin"
    data = bytes(range(256)) * 1000
    p.write_bytes(data)
    assert sha256_file(p, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FRANKLY_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
