"""Which checkpoint files this process has mapped, so a SIGBUS names them.

Reading a page of a memory-mapped file that was truncated (or whose storage failed) after it was mapped
raises SIGBUS in whichever thread touches it, usually deep inside numpy, torch or the C kernels. Python
cannot turn that into an exception: a `signal.signal` handler only runs after the faulting C code returns,
which it never does (the access faults again, forever). So the readers register each mapping here, and the
first registration installs a process-wide SIGBUS handler (libc `signal`, through ctypes) that writes one
message naming the mapped files, and which of them changed size since they were mapped, and the Python
traceback (faulthandler), then puts the previous handler back and returns: the access faults again and the
previous handler (faulthandler's, or the default action: the process dies of SIGBUS) runs as before.
Nothing is "recovered"; the process dies, but it says why. (faulthandler alone cannot add the file names;
a C handler could map the fault address to its file, but would need the kernels' C build: here comparing
each mapped file's size with its size at open names the truncated one.)

The readers also compare the file size before each tensor they read at load time (`check_size`), so a
truncation between open and load is a CheckpointError, not a SIGBUS.
"""
from __future__ import annotations

import ctypes
import faulthandler
import itertools
import os
import signal
import sys
import threading

_lock = threading.Lock()
_ids = itertools.count()
_files: dict[int, tuple[str, int]] = {}     # registration id -> (path, size when mapped)
_snapshot: tuple[tuple[str, int], ...] = ()  # what the handler reads: replaced whole, never mutated
_state: dict = {}                           # 'libc', 'handler' (kept alive), 'previous' once installed


def register(path: str, size: int) -> int:
    """Record a read-only mapping of `path` (`size` bytes at open); returns an id for `unregister`."""
    global _snapshot
    with _lock:
        i = next(_ids)
        _files[i] = (os.path.abspath(path), size)
        _snapshot = tuple(_files.values())
        if "handler" not in _state:
            _install()
    return i


def unregister(i: int | None) -> None:
    global _snapshot
    if i is None:
        return
    with _lock:
        if _files.pop(i, None) is not None:
            _snapshot = tuple(_files.values())


def mapped_files() -> list[tuple[str, int]]:
    return list(_snapshot)


def message() -> str:
    """The text the SIGBUS handler writes (also used by the tests)."""
    changed, others = [], []
    for path, size in _snapshot:
        try:
            now = os.stat(path).st_size
        except OSError as e:
            now = f"gone ({e.strerror})"
        (changed if now != size else others).append((path, size, now))
    lines = ["hybrid_k2: SIGBUS (bus error) reading a memory-mapped checkpoint file: it was truncated or replaced "
             "while in use, or its storage failed."]
    for path, size, now in changed:
        lines.append(f"  {path}: {size} bytes when opened, now {now}{' bytes' if isinstance(now, int) else ''}")
    if others:
        lines.append(("  other mapped files (unchanged size): " if changed else "  mapped files: ")
                     + ", ".join(p for p, _, _ in others))
    if not _snapshot:
        lines.append("  (no checkpoint file is mapped: the fault is elsewhere)")
    return "\n".join(lines) + "\n"


def _on_sigbus(signum: int) -> None:
    # Runs in the faulting thread; ctypes takes the GIL for it. Keep it short: write, restore, return.
    try:
        os.write(2, message().encode("utf-8", "replace"))
        if not faulthandler.is_enabled():   # (when it is, its handler prints the traceback next)
            faulthandler.dump_traceback(all_threads=True)
    except BaseException:   # nothing may escape into the signal context
        pass
    _state["libc"].signal(signal.SIGBUS, _state["previous"])


def _install() -> None:
    if not hasattr(signal, "SIGBUS") or sys.platform == "win32":
        _state["handler"] = None
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    except (OSError, AttributeError):
        _state["handler"] = None
        return
    handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(_on_sigbus)
    _state.update(libc=libc, handler=handler)
    _state["previous"] = libc.signal(signal.SIGBUS, ctypes.cast(handler, ctypes.c_void_p).value)


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
