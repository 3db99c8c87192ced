"""KTransformers' CPU MoE kernel (PyPI `kt-kernel`) on our expert blocks, for bench_kernels.py.

kt-kernel pins an old torch, so install it beside ours without its dependencies:
    pip install --no-deps kt-kernel
Its Python wrapper (KTMoEWrapper) wants CUDA pinned buffers and weight files; its C++ extension does not, so this
module drives the extension directly: CPUInfer (its thread pool) + moe.MOE, the llamafile backend that runs
GGUF block types in place of a GGUF file's tensors. Its activations are bf16 in and out; it quantizes them itself
(to the weight type's vec_dot type, as llama.cpp). For BF16 experts it also has a native AMX (or AVX2) BF16
backend, AMXBF16_MOE, run on the same bf16 matrices (it repacks them to its tile layout at load). Its AMX/AVX-512
INT4/INT8 paths use their own formats, made from float weights by an online quantizer that writes files, so
they are not the same blocks as ours and are not run here.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys

import numpy as np

# our weight types that kt-kernel's llamafile backend takes as the very same bytes (GGML type names)
_GGML_NAMES = {"F32": "FP32", "F16": "FP16"}


def load():
    """(extension module, None), or (None, one line saying why kt-kernel cannot run here)."""
    try:
        import kt_kernel  # noqa: F401 (loads the extension variant for this CPU and registers kt_kernel_ext)
        import kt_kernel_ext as ext
        ext.moe.MOE, ext.moe.MOEConfig, ext.CPUInfer, ext.kvcache.ggml_type   # noqa: B018 (the API used below)
    except ImportError as e:
        if getattr(e, "name", None) in ("kt_kernel", "kt_kernel_ext"):
            return None, "KTransformers comparison skipped: kt-kernel is not installed (pip install --no-deps kt-kernel)"
        return None, f"KTransformers comparison skipped: kt-kernel failed to load ({type(e).__name__}: {e})"
    except Exception as e:   # a broken install must not stop our own bench
        return None, f"KTransformers comparison skipped: kt-kernel failed to load ({type(e).__name__}: {e})"
    return ext, None


@contextlib.contextmanager
def quiet():
    """Its C++ side prints a banner per pool and layer to stdout: send fd 1 to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)   # C stdio's buffer, still pointing at /dev/null
        os.dup2(saved, 1)
        os.close(saved)


def variant() -> str:
    import kt_kernel
    return f"kt-kernel {getattr(kt_kernel, '__version__', '?')} ({getattr(kt_kernel, '__cpu_variant__', '?')} build)"


def ggml_type(ext, name: str):
    """kt-kernel's ggml_type for our weight type `name`, or None when it has no such type."""
    return getattr(ext.kvcache.ggml_type, _GGML_NAMES.get(name, name), None)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (round to nearest even), the activation dtype kt-kernel takes."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


class Pool:
    """kt-kernel's worker pool: one per process (its wrapper keeps a singleton too), `threads` threads, one
    NUMA subpool (the bench runs on one socket)."""

    def __init__(self, ext, threads: int):
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count, cfg.subpool_numa_map, cfg.subpool_thread_count = 1, [0], [threads]
        with quiet():
            self.ext, self.threads, self.cpu = ext, threads, ext.CPUInfer(cfg)


def backends(ext, name: str) -> list[str]:
    """kt-kernel's MoE backends that run our weight type `name` on the same bytes."""
    out = ["llamafile"] if ggml_type(ext, name) is not None and hasattr(ext.moe, "MOE") else []
    if name == "BF16" and (hasattr(ext.moe, "AMXBF16_MOE") or hasattr(ext.moe, "AVX2BF16_MOE")):
        out.append("native BF16")
    return out


class MoELayer:
    """One MoE layer of kt-kernel over gate/up [E, I, row_bytes] and down [E, H, row_bytes] blocks of GGML type
    `name` (the GGUF layout, as ours). backend 'llamafile' reads the weights in place (they must outlive the
    layer: it keeps them); 'native BF16' (BF16 only) copies them to its AMX tile layout at load."""

    def __init__(self, pool: Pool, gate: np.ndarray, up: np.ndarray, down: np.ndarray, name: str, top_k: int,
                 max_tokens: int, backend: str = "llamafile"):
        ext = pool.ext
        if backend not in backends(ext, name):
            raise ValueError(f"kt-kernel's {backend!r} backend does not run {name} (it has: {backends(ext, name)})")
        E, I, H = gate.shape[0], gate.shape[1], down.shape[1]
        if I % 256:
            raise ValueError(f"kt-kernel's MoE backends need I % 256 == 0, got {I}")
        self.pool, self.E, self.H, self.I = pool, E, H, I
        self._mask = np.zeros(E, dtype=np.bool_)   # no expert on a GPU
        cfg = ext.moe.MOEConfig(E, top_k, H, I, self._mask.ctypes.data)
        cfg.layer_idx, cfg.pool = 0, pool.cpu.backend_
        cfg.max_len = max(1, max_tokens)
        arrays = [np.ascontiguousarray(a) for a in (gate, up, down)]
        if backend == "llamafile":
            cfg.m_block, cfg.group_min_len = 32, 10    # its wrapper's settings: forward_one below 10 tokens
            cfg.group_max_len = cfg.max_len
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (a.ctypes.data for a in arrays)
            cfg.gate_type = cfg.up_type = cfg.down_type = ggml_type(ext, name)
            cfg.hidden_type = ext.kvcache.ggml_type.BF16
            cls = ext.moe.MOE
        else:   # per-expert pointers, one NUMA node, no scales (as its NativeMoEWrapper for method BF16)
            cfg.gate_projs, cfg.up_projs, cfg.down_projs = ([[a[e].ctypes.data for e in range(E)]] for a in arrays)
            cfg.gate_scales = cfg.up_scales = cfg.down_scales = [[0] * E]
            cls = getattr(ext.moe, "AMXBF16_MOE", None) or ext.moe.AVX2BF16_MOE
        self.max_tokens, self.backend = cfg.max_len, backend
        p2l = np.arange(E, dtype=np.int64)
        with quiet():
            self.moe = cls(cfg)
            pool.cpu.submit(self.moe.load_weights_task(p2l.ctypes.data))
            pool.cpu.sync()
        self._cfg, self._arrays = cfg, arrays

    def forward(self, x_bf16: np.ndarray, ids: np.ndarray, weights: np.ndarray, out_bf16: np.ndarray) -> None:
        """out = MoE(x) for T tokens: x_bf16/out_bf16 [T, H] uint16 bf16 bits, ids [T, k] int64, weights [T, k]
        float32 (all C-contiguous; checked by the caller once, not per call)."""
        T, k = ids.shape
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens > the layer's max_tokens {self.max_tokens}")
        bsz = np.array([T], np.int32)
        self.pool.cpu.submit(self.moe.forward_task(bsz.ctypes.data, k, ids.ctypes.data, weights.ctypes.data,
                                                   x_bf16.ctypes.data, out_bf16.ctypes.data, False))
        self.pool.cpu.sync()


def probe(names: list[str], threads: int, timeout_s: float = 300.0) -> dict[str, str | None]:
    """Run kt-kernel's layer on a tiny random layer of each type in a child process: a type its C++ side aborts
    or crashes on (an assert in its ggml, a fault) must not take the bench down. {name: None if it ran, else
    why not}. One child for all types; after a crash the rest get a fresh child."""
    result: dict[str, str | None] = {}
    todo = list(names)
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", str(threads), *todo]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            out, rc, err = p.stdout, p.returncode, p.stderr
        except subprocess.TimeoutExpired as e:
            out, rc, err = (e.stdout or b"").decode(errors="replace"), "timeout", ""
        for line in out.splitlines():
            if line.startswith("probe "):
                _, name, status = line.split(" ", 2)
                result[name] = None if status == "ok" else status
        todo = [n for n in todo if n not in result]
        if todo:   # the first one left is where the child died
            how = f"timed out after {timeout_s:.0f} s" if rc == "timeout" else f"exit status {rc}"
            last = next((ln.strip() for ln in reversed(err.splitlines()) if ln.strip()), "")
            result[todo.pop(0)] = f"its layer crashed in a probe run ({how}{': ' + last[:160] if last else ''})"
    return result


def _probe_main(threads: int, names: list[str]) -> None:
    from hybrid_k2.synthetic import random_blocks   # the kernel bench's valid random blocks
    ext, why = load()
    if why:
        for n in names:
            print(f"probe {n} {why}", flush=True)
        return
    pool = Pool(ext, threads)
    rng = np.random.default_rng(0)
    E, H, I, k = 4, 512, 256, 2
    for n in names:
        g, u = (random_blocks(rng, n, E * I, H).reshape(E, I, -1) for _ in range(2))
        d = random_blocks(rng, n, E * H, I).reshape(E, H, -1)
        status = "ok" if backends(ext, n) else f"kt-kernel has no {n} MoE backend"
        for backend in backends(ext, n):
            try:
                layer = MoELayer(pool, g, u, d, n, k, 16, backend)
                for T in (1, 16):   # its one-token and its grouped paths
                    x = to_bf16(rng.standard_normal((T, H)).astype(np.float32))
                    out = np.empty((T, H), np.uint16)
                    layer.forward(x, rng.integers(0, E, (T, k)).astype(np.int64),
                                  np.full((T, k), 0.5, np.float32), out)
                    if not np.isfinite(from_bf16(out)).all():
                        status = f"its {backend} layer gave non-finite outputs"
            except Exception as e:
                status = f"its {backend} layer refused it: {type(e).__name__}: {e}"
        print(f"probe {n} {status}", flush=True)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--probe":
    _probe_main(int(sys.argv[2]), sys.argv[3:])
