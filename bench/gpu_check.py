"""Helpers of bench/gpu_check.sh (stdlib + torch only; each step says what is missing rather than failing).

    python3 bench/gpu_check.py env       # the Python side of the environment; exit 0 with a CUDA GPU, 3 without
    python3 bench/gpu_check.py kernels   # import the built C kernels: ISA, threads; exit 1 if they do not load
    python3 bench/gpu_check.py table LOG # the bench table from bench_hybrid.py's output (or its tail if none)
"""
from __future__ import annotations

import importlib
import sys

# What the device tests import (setup.py's install and test extras, less pexpect and llama-cpp-python, which
# only tests outside the device subset use).
MODULES = ["numpy", "cffi", "pycparser", "gguf", "tiktoken", "regex", "tqdm", "pytest", "transformers",
           "safetensors", "jinja2", "yaml"]
OPTIONAL = ["pytest_timeout", "pexpect", "llama_cpp", "simde_py"]
TABLE_MARK = "=== hybrid bench"


def version(name: str) -> str:
    try:
        m = importlib.import_module(name)
    except Exception as e:                       # noqa: BLE001 (a broken install says why)
        return f"MISSING ({type(e).__name__}: {str(e)[:80]})"
    return str(getattr(m, "__version__", "present"))


def env() -> int:
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    missing = []
    for name in MODULES + OPTIONAL:
        v = version(name)
        if v.startswith("MISSING") and name in MODULES:
            missing.append(name)
        print(f"  {name:15s} {v}{'' if name in MODULES else '   (optional)'}")
    try:
        import torch
    except Exception as e:                       # noqa: BLE001
        print(f"torch: MISSING ({e})")
        return 3
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
          f"{torch.get_num_threads()} CPU threads")
    if missing:
        print(f"MISSING modules the tests import: {', '.join(missing)} (put their wheels in .whl/)")
    if not torch.cuda.is_available():
        print("torch.cuda.is_available(): False")
        return 3
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")
    x = torch.ones(1024, device="cuda")
    torch.cuda.synchronize()
    print(f"a CUDA kernel ran: sum = {float(x.sum()):.0f}; bf16 supported: {torch.cuda.is_bf16_supported()}")
    return 0


def kernels() -> int:
    try:
        from hybrid_k2 import _kernels as ext
        from hybrid_k2 import kernels as k
    except Exception as e:                       # noqa: BLE001
        print(f"the C kernels do not load: {type(e).__name__}: {e}")
        return 1
    print(f"C kernels {ext.__file__}: ISA {k.isa()}, {k.get_threads()} threads")
    return 0


def table(path: str) -> int:
    """Print bench_hybrid.py's closing table from its log; without one, the log's last lines."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        print(f"no bench log: {e}")
        return 1
    at = max((i for i, line in enumerate(lines) if line.startswith(TABLE_MARK)), default=None)
    if at is None:
        print(f"bench_hybrid.py printed no table; the last lines of {path}:")
        print("\n".join(lines[-40:]))
        return 1
    print("\n".join(lines[at:]))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        return env()
    if argv[:1] == ["kernels"]:
        return kernels()
    if argv[:1] == ["table"] and len(argv) == 2:
        return table(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
