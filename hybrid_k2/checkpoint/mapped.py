"""Which checkpoint files this process has mapped, so a SIGBUS names them.

Reading a page of a memory-mapped file that was truncated (or whose storage failed) after it was mapped
raises SIGBUS in whichever thread touches it, usually deep inside numpy, torch or the C kernels' workers.
Python cannot turn that into an exception (a `signal.signal` handler only runs after the faulting C code
returns, which it never does). So the readers register each mapping here, and the list goes to a C handler
(csrc/sigbus.c, installed on the first registration) that writes one message naming the mapped files and
which of them changed size, then hands over to the previous handler (faulthandler's, or the default: the
process dies of SIGBUS). It runs without Python, so a fault in a thread that lacks the GIL cannot stall it.
Nothing is recovered; the process dies, but it says why.

The readers also compare the file size before each tensor they read at load time (`check_size`), so a
truncation between open and load is a CheckpointError, not a SIGBUS.
"""
from __future__ import annotations

import itertools
import os
import threading

_lock = threading.Lock()
_ids = itertools.count()
_files: dict[int, tuple[str, int]] = {}     # registration id -> (path, size when mapped)
_snapshot: tuple[tuple[str, int], ...] = ()


def register(path: str, size: int) -> int:
    """Record a read-only mapping of `path` (`size` bytes at open); returns an id for `unregister`."""
    global _snapshot
    with _lock:
        i = next(_ids)
        _files[i] = (os.path.abspath(path), size)
        _snapshot = tuple(_files.values())
        _publish()
    return i


def unregister(i: int | None) -> None:
    global _snapshot
    if i is None:
        return
    with _lock:
        if _files.pop(i, None) is not None:
            _snapshot = tuple(_files.values())
            _publish()


def mapped_files() -> list[tuple[str, int]]:
    return list(_snapshot)


def message() -> str:
    """What the SIGBUS handler writes for the files mapped now (csrc/sigbus.c writes the same text)."""
    changed, others = [], []
    for path, size in _snapshot:
        try:
            now = os.stat(path).st_size
        except OSError:
            now = None
        (others if now == size else changed).append((path, size, "gone" if now is None else f"{now} bytes"))
    lines = ["hybrid_k2: SIGBUS (bus error) reading a memory-mapped checkpoint file: it was truncated or replaced "
             "while in use, or its storage failed."]
    lines += [f"  {path}: {size} bytes when opened, now {now}" for path, size, now in changed]
    if others:
        lines.append(("  other mapped files (unchanged size): " if changed else "  mapped files: ")
                     + ", ".join(p for p, _, _ in others))
    if not _snapshot:
        lines.append("  (no checkpoint file is mapped: the fault is elsewhere)")
    return "\n".join(lines) + "\n"


def _publish() -> None:
    """Hand the C handler the current list (called under _lock)."""
    try:
        from hybrid_k2 import _kernels
        ffi, lib = _kernels.ffi, _kernels.lib
        lib.hk2_sigbus_watch
    except (ImportError, AttributeError):   # kernels not built, or built before sigbus.c: no message
        return
    paths = [ffi.new("char[]", os.fsencode(p)) for p, _ in _snapshot]
    lib.hk2_sigbus_watch(ffi.new("const char *[]", paths) if paths else ffi.NULL,
                         ffi.new("long long[]", [s for _, s in _snapshot]) if paths else ffi.NULL, len(paths))


def check_size(path: str, mm, size: int, what: str) -> None:
    """Refuse to read `what` from a mapping whose file is no longer `size` bytes (truncated since open)."""
    from . import CheckpointError

    try:
        now = mm.size()
    except (OSError, ValueError):   # closed mapping, or the file is gone
        return
    if now < size:
        raise CheckpointError(f"{path}: the file is now {now} bytes but was {size} when opened (truncated while "
                              f"in use?); cannot read {what}")
