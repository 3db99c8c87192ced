"""Writing side: the checkpoint quantisers and a small safetensors writer (no extra runtime deps).

Used by the tests and by the demo-checkpoint writer to produce files in the same layouts as
Kimi-K2-Instruct (FP8 128x128 blocks) and Kimi-K2-Thinking (compressed-tensors INT4 group 32).
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import torch

from .safetensors import DTYPE_NAMES

FP8_E4M3_MAX = 448.0


def fp8_block_quantize(w: torch.Tensor, block: int | tuple[int, int] = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], scale_inv f32 [ceil(out/bo), ceil(in/bi)]).

    As in DeepSeek-V3/Kimi-K2 checkpoints, scale = amax(block) / 448 and w ~= fp8 * scale
    (the checkpoints call that multiplier `weight_scale_inv`). Edge blocks may be partial.
    """
    bo, bi = (block, block) if isinstance(block, int) else block
    out, inp = w.shape
    nbo, nbi = math.ceil(out / bo), math.ceil(inp / bi)
    padded = torch.zeros(nbo * bo, nbi * bi, dtype=torch.float32)
    padded[:out, :inp] = w
    blocks = padded.view(nbo, bo, nbi, bi)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_E4M3_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.view(nbo * bo, nbi * bi)[:out, :inp].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def int4_group_quantize(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (weight_packed int32 [out, ceil(in/8)], weight_scale bf16 [out, ceil(in/group)],
    weight_shape int32 [2]) in compressed-tensors pack-quantized layout, symmetric: w ~= q * scale,
    q in [-8, 7]. A partial last group gets its own scale (like compressed-tensors' cdiv)."""
    out, inp = w.shape
    ng = math.ceil(inp / group)
    padded = torch.zeros(out, ng * group, dtype=torch.float32)
    padded[:, :inp] = w
    groups = padded.view(out, ng, group)
    scale = (groups.abs().amax(dim=2).clamp_min(1e-12) / 7).to(torch.bfloat16)
    q = torch.round(groups / scale.float()[:, :, None]).clamp(-8, 7).view(out, ng * group)[:, :inp]
    return pack_int4(q.to(torch.int8)), scale.contiguous(), torch.tensor([out, inp], dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] values in [-8, 7] -> int32 [out, ceil(in/8)]: nibble i of word j = column 8j+i, stored
    as q+8, columns zero-padded (compressed-tensors pack_to_int32 with num_bits=4)."""
    out, inp = q.shape
    words = math.ceil(inp / 8)
    u = torch.zeros(out, words * 8, dtype=torch.uint8)
    u[:, :inp] = (q.to(torch.int16) + 8).to(torch.uint8)
    byte = u[:, 0::2] | (u[:, 1::2] << 4)  # little-endian: byte k of a word = columns 2k, 2k+1
    return byte.contiguous().view(torch.int32)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write a .safetensors file readable by the reference `safetensors` package and by transformers."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))  # keeps every tensor aligned
    header: dict = {"__metadata__": {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype} which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_sharded(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], max_shard_bytes: int,
                  metadata: dict | None = None) -> list[str]:
    """Split `tensors` (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)
    and write them like HF: model-0000i-of-0000n.safetensors + model.safetensors.index.json, or a lone
    model.safetensors when everything fits in one shard. Returns the shard file names."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_safetensors(os.path.join(directory, "model.safetensors"), shards[0], metadata)
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        save_safetensors(os.path.join(directory, file), shard, metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def int4_to_q4_0(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, int]:
    """compressed-tensors symmetric INT4 (group 32) -> GGML Q4_0 blocks, without requantizing.

    Both decode as (nibble - 8) * scale, so a Q4_0 block is d = fp16(scale) followed by 16 bytes
    qs[j] = nibble[j] | nibble[j + 16] << 4 (ggml quantize_row_q4_0_ref). Returns (blocks
    [rows, cols/32 * 18] uint8, number of scales fp16 cannot hold exactly)."""
    rows, cols = q.shape
    nb = cols // 32
    d = scale.astype(np.float16)
    inexact = int(np.count_nonzero(d.astype(np.float32) != scale))
    out = np.empty((rows, nb, 18), dtype=np.uint8)
    out[:, :, :2] = d.reshape(rows, nb, 1).view(np.uint8)
    nib = q.reshape(rows, nb, 32)
    np.bitwise_or(nib[:, :, :16], nib[:, :, 16:] << 4, out=out[:, :, 2:])
    return out.reshape(rows, nb * 18), inexact
