"""cffi (API mode) build of the C expert kernels as `hybrid_k2._kernels`.

Used by setup.py (`cffi_modules`). The per-ISA sources carry their own
`#pragma GCC target(...)`, so one set of flags builds every file and the
extension runs on any x86-64 CPU; the ISA is chosen at run time from cpuid.
"""
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from typing import Sequence

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# Sources shared by every build of the kernels (this module, CMake, the SIMDe test library).
TYPE_FAMILIES = ["base", "k", "q", "iq4", "iq23", "iq1", "tq", "float"]  # csrc/quants_<family>{,_avx2,_avx512}.c
COMMON_SOURCES = ["hk2_api.c", "threadpool.c", "sigbus.c", "quants.c", "vec.c", "moe.c", "linear.c", "norm_router.c",
                  "mla.c"] + [f"quants_{f}.c" for f in TYPE_FAMILIES]
X86_SOURCES = ["vec_avx2.c", "vec_avx512.c", "quants_base_avx512bw.c"] + [
    f"quants_{f}_{isa}.c" for f in TYPE_FAMILIES for isa in ("avx2", "avx512")]
# -ffp-contract=off: quantizers must round exactly like ggml's reference (no fused x*id+c)
COMPILE_ARGS = ["-O3", "-std=gnu11", "-pthread", "-fno-math-errno", "-ffp-contract=off", "-fvisibility=hidden",
                "-Wall", "-Wextra", "-Wno-unused-parameter"]


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def sources() -> list[str]:
    names = COMMON_SOURCES + (X86_SOURCES if is_x86() else [])
    return [os.path.join("csrc", n) for n in names]


def cdef_text() -> str:
    """The declarations between the CDEF markers of csrc/hk2.h."""
    with open(os.path.join(CSRC, "hk2.h")) as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*)/\* CDEF END \*/", text, re.S)
    if m is None:
        raise RuntimeError("csrc/hk2.h lacks the CDEF BEGIN/END markers")
    return m.group(1)


def simde_include() -> str | None:
    """The directory holding `simde/x86/avx512.h`: the PyPI package simde-py (the test extra), else a system
    copy (Debian's libsimde-dev), else None."""
    try:
        import simde_py
        dirs = [simde_py.get_include()]
    except ImportError:
        dirs = []
    dirs += [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d] + ["/usr/local/include", "/usr/include"]
    return next((d for d in dirs if os.path.isfile(os.path.join(d, "simde", "x86", "avx512.h"))), None)


def build_shared(out_path: str | None = None, defines: Sequence[str] = (), opt: str = "-O2", cc: str | None = None,
                 include_dirs: Sequence[str] = ()) -> str:
    """Compile the kernel sources into a plain shared library (opened with cffi's ABI mode).

    The tests build the AVX-512 code against SIMDe this way (defines=["HK2_USE_SIMDE"],
    include_dirs=[simde_include()]).
    Objects compile in parallel. Without out_path the library is cached in the temp directory
    under a hash of the sources and flags, so repeated test runs skip the compile. Returns the path."""
    cc = cc or os.environ.get("CC", "cc")
    flags = [opt, "-fPIC", "-std=gnu11", "-pthread", "-fno-math-errno", "-ffp-contract=off", "-I" + CSRC]
    flags += ["-I" + d for d in include_dirs]
    flags += ["-D" + d for d in defines] + ([] if is_x86() else ["-DHK2_NO_X86"])
    if out_path is None:
        h = hashlib.sha256(" ".join([cc, *flags]).encode())
        for name in sorted(os.listdir(CSRC)):
            with open(os.path.join(CSRC, name), "rb") as f:
                h.update(name.encode() + f.read())
        out_path = os.path.join(tempfile.gettempdir(), f"hk2_kernels_{h.hexdigest()[:16]}.so")
        if os.path.exists(out_path):
            return out_path
    tmp = tempfile.mkdtemp(prefix="hk2_build_")
    procs, objs = [], []
    for src in sources():
        obj = os.path.join(tmp, os.path.basename(src) + ".o")
        objs.append(obj)
        procs.append((src, subprocess.Popen([cc, *flags, "-c", os.path.join(ROOT, src), "-o", obj],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"compiling {src} failed:\n{out}")
    part = f"{out_path}.{os.getpid()}.tmp"
    subprocess.run([cc, "-shared", "-pthread", "-o", part, *objs, "-lm"], check=True)
    os.replace(part, out_path)  # atomic: a concurrent run never sees a half-written library
    shutil.rmtree(tmp, ignore_errors=True)
    return out_path


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "hybrid_k2._kernels",
    '#include "hk2.h"',
    sources=sources(),
    include_dirs=["csrc"],
    define_macros=[] if is_x86() else [("HK2_NO_X86", "1")],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
