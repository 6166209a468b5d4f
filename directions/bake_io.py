"""What a bake or a LoRA export reads and where it writes: a fresh copy of the source model, and
the output directory, claimed first, filled in a temporary directory beside it and renamed into
place at the end (nothing half-written is left)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from directions.bake_errors import BakeExistsError, BakeNameError, BakeSourceError, BakeStorageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def source_of(source) -> tuple[str, str | None, str]:
    """(directory or hub id to load, original GGUF or None, what the user called it)."""
    if isinstance(source, str | Path):
        from directions.models import ModelLoadError, locate

        try:
            path, gguf = locate(str(source))
        except ModelLoadError as e:
            raise BakeSourceError(str(e), param="model") from e
        return path, gguf, str(source)
    if source.gguf and not Path(source.path, "config.json").is_file():
        from directions.models import convert_gguf

        convert_gguf(Path(source.gguf))  # an int8 server read the GGUF directly; a bake edits the fp32 copy
    return source.path, source.gguf, getattr(source, "source", source.path)


def load_source_model(path: str, label: str):
    """A fresh CPU copy of the source model (eval mode, no grad) and its tokenizer; never the served one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    except OSError as e:
        raise BakeSourceError(f"could not load the source model {label!r} from {path}: {e}", param="model") from e
    model.eval()
    model.requires_grad_(False)
    return model, tok


# --- the output directory ----------------------------------------------------------------------


def validate_name(name: str, bake_root: str | Path) -> Path:
    """The final directory for ``name`` under ``bake_root``; raises :class:`BakeNameError` if it could escape."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise BakeNameError(
            f"invalid bake name {name!r}: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or digit"
        )
    root = Path(bake_root).resolve()
    final = (root / name).resolve()
    if final.parent != root:
        raise BakeNameError(f"bake name {name!r} resolves outside the bake directory {root}")
    return final


def output_path(out_dir: str | Path, bake_root: str | Path | None) -> Path:
    """The final directory: ``bake_root/out_dir`` for a bare name, else the path ``out_dir`` itself."""
    if bake_root is None:
        out = Path(out_dir).expanduser().absolute()
        bake_root, out_dir = out.parent, out.name
    return validate_name(str(out_dir), bake_root)


def claim_output(final: Path, sources, overwrite: bool) -> None:
    """Refuse to write over or inside a source, or over an existing output without ``overwrite``;
    create the parent directory."""
    for src in filter(None, sources):
        p = Path(src).expanduser()
        if p.exists() and (_inside(p.resolve(), final) or _inside(final, p.resolve())):
            raise BakeExistsError(f"refusing to write {final}: it is or contains the source model {p}")
    if final.exists() and not overwrite:
        raise BakeExistsError(f"{final} already exists (pass overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, final.parent) from e


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def storage_error(e: OSError, where: Path) -> BakeStorageError:
    """The :class:`BakeStorageError` for an ``OSError`` met while writing under ``where``."""
    if e.errno == errno.ENOSPC:
        return BakeStorageError(f"no space left on the device of {where} while writing the baked model")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BakeStorageError(f"no permission to write the baked model under {where}: {e.strerror}")
    return BakeStorageError(f"could not write the baked model under {where}: {e}")


@contextmanager
def staged_output(final: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``final`` to write into; renamed to ``final`` when the block
    ends without an error, removed otherwise. An ``OSError`` becomes a :class:`BakeStorageError`."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        yield tmp
        move_into_place(tmp, final, overwrite)
        tmp = None
    except OSError as e:
        raise storage_error(e, final.parent) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (replacing it only with ``overwrite``)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if not overwrite:
        raise BakeExistsError(f"{final} already exists (pass overwrite to replace it)")
    # A directory cannot be renamed over a non-empty one: park the old one, swap, then delete it.
    old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old / final.name, final)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
