"""Small file helpers the library shares: line lists, JSON lines, sha256 digests, the cache directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (prompt sets, marker and phrase lists)."""
    return [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line."""
    return [json.loads(x) for x in read_lines(path)]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (model files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_key(path: str | Path) -> str:
    """A short key for a file's identity (resolved path, size, mtime): names caches derived from it."""
    p = Path(path)
    st = p.stat()
    return hashlib.sha256(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where derived files live (``FRANKLY_CACHE_DIR`` or ``~/.cache/frankly``): converted models, the demo GGUF."""
    return Path(os.environ.get("FRANKLY_CACHE_DIR", Path.home() / ".cache" / "frankly"))
