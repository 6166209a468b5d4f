"""The errors of a bake or a LoRA export: each says which request field is at fault and its code."""

from __future__ import annotations


class BakeError(Exception):
    """A bake could not be done; ``param`` names the request field at fault (None: not the caller's fault)."""

    param: str | None = None
    code: str = "bake_failed"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class BakeNameError(BakeError):
    param, code = "name", "invalid_name"


class BakeExistsError(BakeError):
    param, code = "name", "bake_exists"


class UnknownDirection(BakeError):
    param, code = "steering", "unknown_direction"


class BakeStrengthError(BakeError):
    param, code = "steering", "invalid_strength"


class BakeSourceError(BakeError):
    code = "source_unavailable"


class BakeStorageError(BakeError):
    code = "storage_error"


class BakeBusyError(BakeError):
    code = "bake_busy"


class BakeGGUFError(BakeError):
    code = "gguf_unsupported"
