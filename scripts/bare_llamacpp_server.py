#!/usr/bin/env python
"""``python -m llama_cpp.server`` with llama.cpp's extra CPU buffer types set as frankly's llama.cpp
engine sets them (:func:`directions.llamacpp.use_extra_buffer_types`: off on builds with AMX kernels,
which crashed on the build machine), so the benchmark compares the two on the same kernels.

    python scripts/bare_llamacpp_server.py --model FILE.gguf --port 8001 [llama_cpp.server flags]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import llama_cpp.llama_cpp as C

    from directions.llamacpp import use_extra_buffer_types

    extra = use_extra_buffer_types()
    default = C.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = extra
        return p

    C.llama_model_default_params = params
    print(f"llama.cpp extra CPU buffer types: {'on' if extra else 'off'}", file=sys.stderr, flush=True)
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
