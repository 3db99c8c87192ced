"""The real `hybrid-k2` command (subprocesses): bad arguments and bad files give one `error:` line and exit 2,
before anything is loaded; Ctrl-C and SIGTERM during load and during generation exit cleanly."""
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hybrid_k2 import cli

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, **kw)


def _assert_usage_error(name, p, out, err, match, loaded=False):
    assert p.returncode == 2, f"{name}: exit {p.returncode}\n{err}"
    assert "Traceback" not in err, f"{name}:\n{err}"
    # argparse's own errors come after its usage block; ours are the only line (after the load's progress, if any)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 or loaded, f"{name}: {err!r}"
    assert lines[-1].startswith(("error: ", "hybrid-k2 bench: error: ")) and match in lines[-1], f"{name}: {err!r}"


def test_bad_arguments_are_one_error_line_before_loading(demo, tmp_path):
    """The cases that printed a traceback (exit 1), through the real command."""
    trace = tmp_path / "trace.npz"
    np.savez(trace, ids=np.zeros((8, 2, 2), np.int16))
    raw = trace.read_bytes()
    crc = bytearray(raw)
    crc[len(raw) // 3] ^= 0xFF                                             # a flipped byte in the array data
    (tmp_path / "crc.npz").write_bytes(bytes(crc))
    gen = ["hybrid_k2", "generate", str(demo), "-p", "hi", "-n", "2"]
    cuda = "cuda" if not torch.cuda.is_available() else "cuda:1000"
    cases = {   # name: (argv, text the error line must contain)
        "--threads 0": (gen + ["--threads", "0"], "--threads must be in [1, 1024]"),
        f"--device {cuda}": (gen + ["--device", cuda], f"--device '{cuda}'"),
        "--device foo": (gen + ["--device", "foo"], "expected cpu, cuda or cuda:N"),
        "--vram 1e400GiB": (gen + ["--vram", "1e400GiB"], "--vram"),
        "bench --threads 0": (["hybrid_k2", "bench", "--threads", "0"], "--threads must be in [1, 1024]"),
        "bench --layers -1": (["hybrid_k2", "bench", "--layers", "-1"], "--layers must be at least 1"),
        "sim corrupt trace": (["hybrid_k2.sim", str(tmp_path / "crc.npz"), "--slots", "4", "--pcie-gbps", "25",
                               "--ram-gbps", "50"], "not a readable .npz trace"),
    }
    procs = {}
    for name, (argv, match) in cases.items():     # two at a time: each is mostly the interpreter's start
        procs[name] = (_start(argv), match)
        if len(procs) % 2 == 0:
            procs[name][0].wait(120)
    for name, (p, match) in procs.items():
        out, err = p.communicate(timeout=120)
        _assert_usage_error(name, p, out, err, match)
        if name.startswith("--"):
            assert "weights" not in err, f"{name}: the model was loaded before the argument was checked"


@pytest.mark.parametrize("argv, match", [
    (["--vram", "1" + "0" * 400 + "GiB"], "--vram"),
    (["--ctx", "0"], "--ctx must be >= 1"),
    (["-n", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be finite and >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--stop", ""], "a stop string must be non-empty"),
    (["--cache-slots", "-1"], "--cache-slots must be >= 0"),
    (["--threads", "5000"], "--threads must be in [1, 1024]"),
])
def test_more_bad_arguments_refused_before_loading(capsys, argv, match):
    # in-process main(), the command's own code path: a model that does not exist shows nothing is loaded
    assert cli.main(["generate", "/nonexistent/model", "-p", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "no such file" not in err


def test_bad_files_are_one_error_line(demo, tmp_path, capsys):
    trace = tmp_path / "trace.npz"
    np.savez(trace, ids=np.zeros((8, 2, 2), np.int16))
    (tmp_path / "bad.npz").write_bytes(trace.read_bytes()[:100])          # truncated zip
    from hybrid_k2 import sim
    assert sim.main([str(tmp_path / "bad.npz"), "--slots", "4", "--pcie-gbps", "25", "--ram-gbps", "50"]) == 2
    assert "bad.npz: not a readable .npz trace" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    (broken / "model.safetensors").write_bytes((demo / "model.safetensors").read_bytes()[:5000])
    assert cli.main(["generate", str(broken), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err
    bare = tmp_path / "bare"                    # no tiktoken.model: cannot generate text
    bare.mkdir()
    for f in demo.iterdir():
        if f.name != "tiktoken.model":
            shutil.copy(f, bare / f.name)
    assert cli.main(["generate", str(bare), "-p", "hi", "-n", "2", "--experts", "torch"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {bare} has no tokenizer")


SIGNALS = {signal.SIGINT: (130, "hybrid-k2: interrupted"), signal.SIGTERM: (143, "hybrid-k2: terminated (SIGTERM)")}


def test_signals_during_load_and_generation_exit_cleanly():
    """Ctrl-C and SIGTERM, each during the load (right after it starts printing progress) and mid-decode (a
    100,000-token generation that has started printing): one message line, exit 130 / 143, no traceback. The
    four commands run side by side; each is signalled as soon as its phase shows."""
    runs = {}
    for sig in SIGNALS:
        for phase in ("load", "decode"):
            runs[(sig, phase)] = _start(["hybrid_k2", "generate", "demo", "-p", "def main(", "-n", "100000",
                                         "--ctx", "4096"])
    pending = {(p.stderr if phase == "load" else p.stdout).fileno(): (sig, phase, p)
               for (sig, phase), p in runs.items()}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 1)
        for fd in ready:
            sig, phase, p = pending.pop(fd)
            os.read(fd, 1)
            p.send_signal(sig)
    assert not pending, "some commands printed nothing"
    for (sig, phase), p in runs.items():
        out, err = p.communicate(timeout=60)
        code, message = SIGNALS[sig]
        assert p.returncode == code, (sig, phase, err[-500:])
        assert "Traceback" not in err and err.rstrip().endswith(message), (sig, phase, err[-500:])
        if phase == "load":
            assert "loaded demo" not in err and out == "", (sig, phase, err[-500:])
        else:
            assert "[prefill" not in err, (sig, phase)   # stopped before the end (the stats line)
