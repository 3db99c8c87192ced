"""Fuzzing the GGUF reader, the safetensors/HF reader and config parsing (issue 11, item 4).

Seeds are real files: the tiny Kimi-K2-shaped HF checkpoint of test_hardening_readers (FP8 dense, INT4
experts, one file and a sharded copy with an index) and the deepseek2 GGUFs hybrid_k2.convert makes of it.
Each input is a seed mutated by a few operations (numeric header fields set to edge values, bytes
overwritten, the file cut or extended; safetensors header JSON entries retyped, reshaped, moved, removed;
index entries pointed outside; config fields set to values of every JSON type), then read the way the
loader reads it: open, config, check_config_against, every tensor's shape/format/data, raw blocks, the
tokenizer vocabulary. The property: each input either reads cleanly or raises one of our errors
(CheckpointError / ConfigError) whose message names the file; no other exception, no crash, no hang.

In the test suite: a bounded, derandomized budget (HK2_FUZZ_EXAMPLES inputs per target, default 300), each
input in-process under a time limit. Longer runs, each input in a worker process (a crash cannot take the
run down; it is counted and the input kept), with a memory cap and a hang timeout:

    python tests/test_fuzz.py --examples 10000 [--targets gguf,safetensors,config] [--workers 2] [--seed 1]

prints the outcome counts per target (opened OK / rejected, by error class / bugs / crashes / hangs).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # test_hardening_readers, when run as a script

from hybrid_k2.checkpoint import CheckpointError, HFCheckpoint, check_config_against  # noqa: E402
from hybrid_k2.checkpoint.gguf import GGUFCheckpoint  # noqa: E402
from hybrid_k2.config import ConfigError, ModelConfig  # noqa: E402

TARGETS = ("gguf", "safetensors", "config")
# a rejection names what is wrong: a quoted tensor / key / field / shard name, or a metadata key
NAMED = re.compile(r"'[^']+'|\"[^\"]+\"|\bdeepseek2\.|tokenizer\.|general\.|\bfield\b|quantization_config|"
                   r"__metadata__|weight_map|header length|safetensors header|metadata key \d+|tensor \d+|"
                   r"tensor count|metadata key count|GGUF magic|GGUF version")
CASE_SECONDS = 20      # one input: far above the ~50 ms a full read of a seed takes
OURS = (CheckpointError, ConfigError)


# ---- seeds ----------------------------------------------------------------------------------------------
def make_seeds(root: str) -> dict:
    """The real files every mutation starts from (written once per run)."""
    from hybrid_k2.convert import convert
    from test_hardening_readers import write_tiny_hf

    hf = os.path.join(root, "hf")
    write_tiny_hf(hf)
    sharded = os.path.join(root, "hf_sharded")
    write_tiny_hf(sharded, shard_bytes=20_000)
    ggufs = [convert(hf, os.path.join(root, f"tiny-{e}-{o}.gguf"), experts=e, other=o, progress=False)
             for e, o in (("q4_0", "q8_0"), ("q8_0", "f16"))]
    return {"root": root, "hf": hf, "hf_sharded": sharded, "gguf": ggufs}


def gguf_slots(path: str) -> tuple[list[list[tuple[int, str]]], int]:
    """The numeric fields of a GGUF header, grouped per metadata key / tensor info (so a 160k-token array does
    not drown the rest): [[(byte offset, numpy dtype str), ...], ...] -- counts, string lengths, value types,
    scalar values, array item types and counts, tensor dims, types and offsets; and where the data starts."""
    import gguf
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    groups = []
    for parts in [f.parts for f in r.fields.values()] + [t.field.parts for t in r.tensors]:
        slots = []
        for p in parts:
            if p.dtype.kind in "uif" and p.dtype.itemsize > 1 and p.size <= 8:
                slots += [(p.ctypes.data - base + i * p.dtype.itemsize, p.dtype.str) for i in range(p.size)]
            elif p.dtype == np.bool_:
                slots.append((p.ctypes.data - base, "|u1"))
        if slots:
            groups.append(slots)
    return groups, int(r.data_offset)


# ---- drawing: one vocabulary for hypothesis (shrinks) and for the random long run ------------------------
class RandomDraw:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]


class HypothesisDraw:
    def __init__(self, data):
        from hypothesis import strategies as st
        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def pick(self, seq):
        return self.data.draw(self.st.sampled_from(seq))


def edge_int(d, bits: int, old: int) -> int:
    top = (1 << bits) - 1
    return d.pick([0, 1, 2, 3, top, top - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1, old + 1, old - 1, old * 2,
                   old + 32, old - 32, d.int(0, top), 4096, 65536, 1 << 31])


EDGE_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e38, 3.4e38, 1e-7]
EDGE_DOUBLES = [1e300, -1e300, 1e-300, 5e-324, 1e-320, 1.7e308, 2.5, 64.0, 1e30, 1e-30]


def mutate_gguf(d, data: bytes, slots, data_start: int) -> bytes:
    b = bytearray(data)
    for _ in range(d.int(1, 3)):
        op = d.pick(["slot", "slot", "slot", "byte", "cut", "extend"])
        if op == "slot":
            group = d.pick(slots)
            off, dt = group[d.int(0, min(len(group), 6) - 1)] if d.int(0, 3) else d.pick(group)
            dt = np.dtype(dt)
            if dt.kind == "f":
                raw = np.array([d.pick(EDGE_FLOATS)], dtype=dt).tobytes()
            else:
                old = int(np.frombuffer(bytes(b[off:off + dt.itemsize]), dtype=dt.newbyteorder("<"))[0]) \
                    if off + dt.itemsize <= len(b) else 0
                v = edge_int(d, dt.itemsize * 8, old) % (1 << (dt.itemsize * 8))
                raw = v.to_bytes(dt.itemsize, "little")
            b[off:off + len(raw)] = raw
        elif op == "byte":   # mostly in the header, sometimes in the tensor data (block scales live there)
            hi = data_start if d.int(0, 3) else len(b) - 1
            at = d.int(0, max(hi, 1) - 1)
            b[at:at + 1] = bytes([d.int(0, 255)])
        elif op == "cut":
            del b[d.pick([d.int(0, len(b)), d.int(0, data_start), len(b) - d.int(1, 64)]):]
        else:
            b += bytes(d.int(0, 255) for _ in range(d.int(1, 40)))
    return bytes(b)


SAFETENSOR_DTYPES = ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I32", "I64", "U8", "BOOL", "F64", "Q4", "", 7, None]


def edge_json(d, old=None):
    """A JSON value of any type, biased to the edges (and to numbers near `old`)."""
    kind = d.pick(["int", "int", "float", "str", "bool", "null", "list", "dict", "near"])
    if kind == "int":
        return d.pick([0, 1, -1, 2, 3, 7, 32, 64, 4096, 1 << 20, 1 << 24, (1 << 31) - 1, 1 << 32, 1 << 63, 10**30,
                       -(1 << 63), d.int(-10**6, 10**6)])
    if kind == "float":
        return d.pick(EDGE_FLOATS + EDGE_DOUBLES)
    if kind == "str":
        return d.pick(["", "yarn", "silu", "noaux_tc", "softmax", "x" * 5, "../x", "NaN", "1"])
    if kind == "bool":
        return d.pick([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return d.pick([[], [1], [32, 32], [0, 0], [1e9, 1e9], ["a"], [[1]], [1, 2, 3]])
    if kind == "dict":
        return d.pick([{}, {"type": "yarn"}, {"a": 1}])
    if isinstance(old, bool) or not isinstance(old, (int, float)):
        return old
    return d.pick([old + 1, old - 1, old * 2, -old, old // 2 if isinstance(old, int) else old / 2, old * 1000])


def mutate_safetensors_file(d, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = bytearray(data[8 + n:])
    names = [k for k in header if k != "__metadata__"]
    for _ in range(d.int(1, 3)):
        op = d.pick(["dtype", "shape", "offsets", "drop", "rename", "add", "meta", "len", "byte", "cut", "scale"])
        name = d.pick(names)
        e = header.get(name)
        if not isinstance(e, dict):
            continue
        if op == "dtype":
            e["dtype"] = d.pick(SAFETENSOR_DTYPES)
        elif op == "shape":
            shape = e.get("shape")
            shape = list(shape) if isinstance(shape, list) else []
            if shape and d.int(0, 1):
                shape[d.int(0, len(shape) - 1)] = edge_json(d, shape[0])
            else:
                shape = edge_json(d)
            e["shape"] = shape
        elif op == "offsets":
            offs = e.get("data_offsets")
            offs = list(offs) if isinstance(offs, list) and len(offs) == 2 else [0, 0]
            i = d.int(0, 1)
            offs[i] = d.pick([offs[i] + 1, offs[i] - 1, offs[i] + 8, 0, len(body), len(body) + 1, 1 << 62, -1,
                              offs[1 - i], 1.5])
            e["data_offsets"] = offs if d.int(0, 5) else edge_json(d)
        elif op == "drop":
            if d.int(0, 1):
                e.pop(d.pick(["dtype", "shape", "data_offsets"]), None)
            else:
                header.pop(name)
        elif op == "rename":
            header[d.pick(["", "model.layers.99.mlp.gate.weight", name + "_scale_inv", name[:-1]])] = header.pop(name)
        elif op == "add":
            header[d.pick(["x", "model.layers.7.input_layernorm.weight", "model.layers.1.mlp.experts.9.up_proj.weight"])] \
                = {"dtype": d.pick(SAFETENSOR_DTYPES), "shape": edge_json(d), "data_offsets": edge_json(d)}
        elif op == "meta":
            header["__metadata__"] = edge_json(d)
        elif op in ("byte", "scale"):   # tensor data: scales of FP8/INT4 are refused when not finite
            if op == "scale":
                scales = [k for k in header if k.endswith(("_scale_inv", "_scale")) and isinstance(header[k], dict)]
                e = header[d.pick(scales)] if scales else e
            offs = e.get("data_offsets")
            lo, hi = offs if isinstance(offs, list) and len(offs) == 2 else (0, 0)
            if isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= len(body):
                at = d.int(lo, hi - 1)
                body[at] = d.pick([0xFF, 0x7F, 0x80, d.int(0, 255)])
        elif op == "cut":
            del body[d.int(0, len(body)):]
    blob = json.dumps(header).encode()
    if d.int(0, 1):
        blob += b" " * d.int(0, 8)
    length = len(blob)
    if d.int(0, 4) == 0:
        length = d.pick([length - 1, length + 1, 0, 1, 1 << 63, len(blob) + len(body)])
    return struct.pack("<Q", length % (1 << 64)) + blob + bytes(body)


def mutate_hf_dir(d, seeds: dict, out: str) -> str:
    """A copy of one of the HF seeds with its shard / index / quantization config mutated."""
    src = d.pick([seeds["hf"], seeds["hf_sharded"]])
    shutil.copytree(src, out)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    what = d.pick(["shard", "shard", "shard", "index", "quant"])
    if what == "index" and os.path.exists(os.path.join(out, "model.safetensors.index.json")):
        p = os.path.join(out, "model.safetensors.index.json")
        idx = json.load(open(p))
        wm = idx["weight_map"]
        k = d.pick(sorted(wm))
        op = d.pick(["path", "path", "value", "drop", "map"])
        if op == "path":
            wm[k] = d.pick(["../hf/model.safetensors", "/etc/passwd", "", ".", "..", "sub/x.safetensors",
                            os.path.join(out, files[0]), files[0] + "\0", "missing.safetensors", "./" + files[0]])
        elif op == "value":
            wm[k] = edge_json(d)
        elif op == "drop":
            del wm[k]
        else:
            idx["weight_map"] = edge_json(d)
        json.dump(idx, open(p, "w"))
    elif what == "quant":
        p = os.path.join(out, "config.json")
        cfg = json.load(open(p))
        q = cfg["quantization_config"]
        key = d.pick(["weight_block_size", "config_groups", "group_size", "num_bits", "whole"])
        if key == "weight_block_size":
            q[key] = edge_json(d) if d.int(0, 1) else [edge_json(d, 32), edge_json(d, 32)]
        elif key == "config_groups":
            q[key] = edge_json(d)
        elif key in ("group_size", "num_bits"):
            q["config_groups"]["group_0"]["weights"][key] = edge_json(d, 32 if key == "group_size" else 4)
        else:
            cfg["quantization_config"] = edge_json(d)
        json.dump(cfg, open(p, "w"))
    else:
        p = os.path.join(out, d.pick(files))
        data = open(p, "rb").read()
        open(p, "wb").write(mutate_safetensors_file(d, data))
    return out


CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
                 "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
                 "moe_layer_freq", "rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id",
                 "eos_token_id", "tie_word_embeddings", "model_type", "hidden_act", "num_nextn_predict_layers",
                 "rope_scaling", "rope_parameters"]
ROPE_FIELDS = ["type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
               "mscale_all_dim", "attention_factor", "truncate", "rope_theta"]


def mutate_config(d, cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for _ in range(d.int(1, 3)):
        if d.int(0, 2) == 0 and isinstance(cfg.get("rope_scaling"), dict):
            rs, k = cfg["rope_scaling"], d.pick(ROPE_FIELDS)
            if d.int(0, 5) == 0:
                rs.pop(k, None)
            else:
                rs[k] = edge_json(d, rs.get(k))
        else:
            k = d.pick(CONFIG_FIELDS)
            if d.int(0, 5) == 0:
                cfg.pop(k, None)
            else:
                cfg[k] = edge_json(d, cfg.get(k))
    return cfg


# ---- reading an input the way the loader does -------------------------------------------------------------
def read_gguf(path: str) -> None:
    with GGUFCheckpoint(path) as g:
        cfg = ModelConfig.from_dict(g.config_dict(), source=path)
        check_config_against(g, cfg)
        g.metadata()
        g.chat_template()
        if g._meta("tokenizer.ggml.model", None) == "gpt2":
            g.tokenizer_vocab()
        for name in g.names():
            g.shape(name), g.format(name)
            g.get(name)
            if name in g._entries and g._entries[name][0] == "plain" and len(g.shape(name)) == 2:
                g.raw_blocks(name)
            if name.endswith("kv_b_proj.weight"):
                g.kv_b_blocks(name)
        for layer in g.moe_layers():
            g.expert_blocks(layer)


def read_hf(path: str) -> None:
    cfg = ModelConfig.from_json(path)
    with HFCheckpoint(path) as ck:
        check_config_against(ck, cfg)
        for name in ck.names():
            ck.shape(name), ck.format(name)
            ck.get(name)
            if ck.format(name) == "int4_group":
                ck.get_int4(name)


def read_config(path: str, ckpt_dir: str) -> None:
    """config.json parsed and checked against the (intact) tiny checkpoint; an accepted config must give finite
    RoPE tables, softmax scale and logits from that checkpoint (the math that used to fail, or go NaN, at the
    first generate())."""
    import torch

    from hybrid_k2.experts.torch_backend import TorchExperts
    from hybrid_k2.generate import Engine
    from hybrid_k2.loader import build_model
    from hybrid_k2.model import rope_tables
    cfg = ModelConfig.from_json(path)
    with HFCheckpoint(ckpt_dir) as ck:
        check_config_against(ck, cfg)
        rope = rope_tables(cfg, 64)
        assert bool(np.isfinite(rope.abs().numpy()).all()) and math.isfinite(cfg.softmax_scale), \
            f"accepted config gives non-finite RoPE/softmax scale: {cfg}"
        net = build_model(cfg, ck, "cpu", torch.float32)
        net.set_experts(TorchExperts.from_checkpoint(ck, cfg, "cpu", torch.float32))
        n = min(8, cfg.max_position_embeddings - 1)   # the engine keeps one position free
        logits = Engine(net, None).logits(list(range(1, 1 + n))) if n > 0 else torch.zeros(1)
    assert bool(torch.isfinite(logits).all()), f"accepted config gives non-finite logits: {cfg}"


class _Hang(BaseException):   # not an Exception: no except clause in the readers can swallow it
    pass


def _alarm(signum, frame):
    raise _Hang()


LAST_MESSAGE = [""]   # the message of the last rejection, for the long run's report


def classify(fn, path: str, seconds: float = CASE_SECONDS) -> str:
    """'ok', or the error class for one of ours naming the file, or 'BUG ...' / 'hang' for anything else."""
    LAST_MESSAGE[0] = ""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
        return "ok"
    except _Hang:
        return "hang"
    except OURS as e:
        if path not in str(e):
            return f"BUG {type(e).__name__} without the file: {e}"
        LAST_MESSAGE[0] = str(e).replace(path, "<input>")
        return type(e).__name__
    except MemoryError:
        return "BUG MemoryError"
    except Exception as e:   # noqa: BLE001 - the point: anything else is a finding
        return f"BUG {type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Cases:
    """Builds and reads mutated inputs under a scratch directory."""

    def __init__(self, seeds: dict):
        self.seeds = seeds
        self.gguf = [(open(p, "rb").read(), *gguf_slots(p)) for p in seeds["gguf"]]
        self.config = json.load(open(os.path.join(seeds["hf"], "config.json")))
        self.n = 0

    def run(self, target: str, d, scratch: str) -> tuple[str, str]:
        """(outcome, the input's path: a file or directory under scratch)."""
        self.n += 1
        if target == "gguf":
            data, slots, start = d.pick(self.gguf)
            path = os.path.join(scratch, f"case{self.n}.gguf")
            open(path, "wb").write(mutate_gguf(d, data, slots, start))
            return classify(lambda: read_gguf(path), path), path
        if target == "safetensors":
            path = mutate_hf_dir(d, self.seeds, os.path.join(scratch, f"case{self.n}"))
            return classify(lambda: read_hf(path), path), path
        path = os.path.join(scratch, f"case{self.n}.json")
        with open(path, "w") as f:
            json.dump(mutate_config(d, self.config), f)   # NaN / Infinity as Python's json writes them
        return classify(lambda: read_config(path, self.seeds["hf"]), path), path


def discard(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


# ---- pytest: a bounded, derandomized budget ---------------------------------------------------------------
try:
    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:   # the long-run script needs neither
    pytest = None

if pytest is not None:
    EXAMPLES = int(os.environ.get("HK2_FUZZ_EXAMPLES", "300"))

    @pytest.fixture(scope="module")
    def cases(tmp_path_factory):
        return Cases(make_seeds(str(tmp_path_factory.mktemp("fuzz_seeds"))))

    @pytest.fixture(scope="module")
    def tally():
        counts = collections.defaultdict(collections.Counter)
        yield counts
        for target, c in counts.items():
            print(f"\nfuzz {target}: {sum(c.values())} inputs: {dict(c)}")

    @pytest.mark.parametrize("target", TARGETS)
    def test_fuzz_readers(cases, tally, tmp_path_factory, target):
        scratch = str(tmp_path_factory.mktemp(f"fuzz_{target}"))

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="HK2_FUZZ_EXAMPLES" not in os.environ,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(st.data())
        def one(data):
            outcome, path = cases.run(target, HypothesisDraw(data), scratch)
            tally[target][outcome.split(":")[0]] += 1
            assert not outcome.startswith("BUG") and outcome != "hang", f"{path}: {outcome}"
            discard(path)

        one()
        assert sum(tally[target].values()) >= EXAMPLES


# ---- the long run: workers in subprocesses ----------------------------------------------------------------
def worker(target: str, seeds_json: str, first: int, count: int, seed: int, scratch: str, mem_gb: float) -> None:
    limit = int(mem_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cases = Cases(json.loads(seeds_json))
    for i in range(first, first + count):
        outcome, path = cases.run(target, RandomDraw(random.Random(f"{seed}:{target}:{i}")), scratch)
        print(f"{i}\t{outcome}\t{LAST_MESSAGE[0][:400]!r}", flush=True)
        if not outcome.startswith("BUG") and outcome != "hang":
            discard(path)


def long_run(examples: int, targets: list[str], workers: int, seed: int, mem_gb: float, keep: str) -> int:
    root = tempfile.mkdtemp(prefix="hk2-fuzz-")
    seeds = make_seeds(os.path.join(root, "seeds"))
    os.makedirs(keep, exist_ok=True)
    counts = {t: collections.Counter() for t in targets}
    named = {t: collections.Counter() for t in targets}
    unnamed = collections.Counter()
    findings = []
    t0 = time.time()
    me = os.path.abspath(__file__)
    todo = [(t, i, min(250, examples - i)) for t in targets for i in range(0, examples, 250)]   # worker batches
    running: list = []
    while todo or running:
        while todo and len(running) < workers:
            target, first, n = todo.pop(0)
            scratch = tempfile.mkdtemp(dir=root)
            p = subprocess.Popen([sys.executable, me, "--worker", target, json.dumps(seeds), str(first), str(n),
                                  str(seed), scratch, str(mem_gb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
            running.append((p, target, first, n, scratch))
        p, target, first, n, scratch = running.pop(0)
        try:   # a worker reports each input as it finishes; a whole batch far past its budget is a hang
            out, err = p.communicate(timeout=max(600, n * CASE_SECONDS))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done = {}
        for line in out.splitlines():
            i, outcome, msg = line.split("\t", 2)
            done[int(i)] = outcome
            msg = eval(msg)   # repr of a str, written by our worker
            if msg:
                named[target]["names a tensor/key/field" if NAMED.search(msg) else "names the file only"] += 1
                if not NAMED.search(msg):
                    unnamed[re.sub(r"\d+", "#", msg)[:160]] += 1
        for i, outcome in done.items():
            counts[target]["BUG" if outcome.startswith("BUG") else outcome] += 1
            if outcome.startswith("BUG") or outcome == "hang":
                findings.append((target, i, outcome))
        last = max(done, default=first - 1)
        if last < first + n - 1:   # the worker died (a signal, the memory cap) or hung on input last + 1
            rc = p.returncode
            kind = ("hang" if rc == -signal.SIGKILL else f"crash (signal {-rc})" if rc < 0
                    else f"harness error (exit {rc})")
            counts[target][kind.split(" ")[0]] += 1
            findings.append((target, last + 1, f"{kind}: {err[-800:]}"))
            if last + 2 < first + n:   # resume after the input that took the worker down
                todo.insert(0, (target, last + 2, first + n - (last + 2)))
        for f in os.listdir(scratch):   # inputs that were findings stay, for reproduction
            shutil.move(os.path.join(scratch, f), os.path.join(keep, f"{target}-{first}-{f}"))
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{examples} inputs per target, seed {seed}, {time.time() - t0:.0f} s")
    for target in targets:
        c = counts[target]
        print(f"  {target:12s} {sum(c.values()):6d} inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        print(f"  {'':12s} rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(named[target].items())))
    for msg, n in unnamed.most_common(25):
        print(f"  file-level rejection x{n}: {msg}")
    for f in findings[:50]:
        print("  FINDING", *f)
    return 1 if findings else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=10000, help="inputs per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mem-gb", type=float, default=6.0, help="address-space cap of each worker")
    ap.add_argument("--keep", default="fuzz-findings", help="where inputs that were findings are kept")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        target, seeds, first, n, seed, scratch, mem = a.worker
        worker(target, seeds, int(first), int(n), int(seed), scratch, float(mem))
        return 0
    return long_run(a.examples, [t for t in a.targets.split(",") if t], a.workers, a.seed, a.mem_gb, a.keep)


if __name__ == "__main__":
    sys.exit(main())
