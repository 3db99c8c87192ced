"""`hybrid-k2 convert` never replaces what it must not (its inputs, a directory, a device node or FIFO), writes
through a temp file beside OUT, and leaves neither OUT nor a temp file when it fails or is terminated."""
import hashlib
import os
import select
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from hybrid_k2 import cli
from hybrid_k2.checkpoint import open_checkpoint
from hybrid_k2.convert import convert
from hybrid_k2.demo import TRAINED_DEMO_DIR, ensure_demo


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_naming_an_input_is_refused(demo, tmp_path):
    shard = demo / "model.safetensors"
    before = _digest(shard)
    p = subprocess.run([sys.executable, "-m", "hybrid_k2", "convert", str(demo), str(shard)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: {shard}: is an input of this conversion ({shard}); " \
                                                "write the GGUF elsewhere"
    os.link(shard, tmp_path / "hard.safetensors")           # the same inode by another name
    os.symlink(demo / "config.json", tmp_path / "cfg-link.json")
    for out in (demo / "config.json", tmp_path / "hard.safetensors", tmp_path / "cfg-link.json"):
        with pytest.raises(ValueError, match="is an input of this conversion"):
            convert(demo, out, progress=False)
    assert _digest(shard) == before and (demo / "config.json").read_text().startswith("{")


def test_out_directory_is_refused_before_converting(demo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["convert", str(demo), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out}: is a directory; OUT names the .gguf file to write\n"   # no progress bar: no work
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_not_a_regular_file_is_refused(demo, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    nodes = [fifo]
    if os.geteuid() == 0:          # root can make a device node: a copy of /dev/null's, in tmp_path
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        nodes.append(dev)
    for node in nodes:
        with pytest.raises(ValueError, match="not a regular file"):
            convert(demo, node, progress=False)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    if len(nodes) > 1:
        assert stat.S_ISCHR(os.stat(nodes[1]).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n.name for n in nodes)


def test_writes_through_a_private_temp_file_beside_out(demo, tmp_path):
    out = tmp_path / "demo.gguf"
    (tmp_path / "demo.gguf.part").write_text("the user's own file")      # the old fixed temp name
    out.write_text("an older conversion")
    assert convert(demo, out, progress=False) == str(out)
    assert (tmp_path / "demo.gguf.part").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.gguf", "demo.gguf.part"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask
    with open_checkpoint(out) as ck:
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in ck


def test_failed_conversion_leaves_out_untouched_and_no_temp(demo, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(demo, src)
    (src / "tiktoken.model").write_text("not base64 at all\n")     # fails after the temp file exists
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "model.gguf").write_text("an older conversion")
    with pytest.raises(ValueError):
        convert(src, dst / "model.gguf", progress=False)
    assert [p.name for p in dst.iterdir()] == ["model.gguf"]
    assert (dst / "model.gguf").read_text() == "an older conversion"


def test_sigterm_mid_conversion_leaves_nothing(tmp_path):
    src = TRAINED_DEMO_DIR if (TRAINED_DEMO_DIR / "config.json").is_file() else ensure_demo(tmp_path / "cache")
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    # f32 dense matrices: the biggest file, so the tensors take longest to write
    p = subprocess.Popen([sys.executable, "-m", "hybrid_k2", "convert", str(src), str(out), "--other", "f32"],
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = ""
    while "convert: " not in seen:                   # the tensor-data progress bar: the temp file is being written
        r, _, _ = select.select([p.stderr], [], [], 60)
        assert r, "no progress bar"
        ch = os.read(p.stderr.fileno(), 1).decode(errors="replace")
        assert ch, f"exited early: {seen}"
        seen += ch
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143 and "Traceback" not in err, seen + err
    assert err.rstrip().endswith("hybrid-k2: terminated (SIGTERM)")
    assert list(out.parent.iterdir()) == []
