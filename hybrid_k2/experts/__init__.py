"""Routed-expert backends: `submit(layer, x[T,H], ids[T,K], weights[T,K]) -> future of y[T,H]`.

`torch` is the reference (dequantized weights, torch matmuls on the accelerator); `cpu` runs GGML blocks
in the C kernels; `hybrid` puts VRAM slots in front of the CPU kernels.
"""
from __future__ import annotations

import signal

import torch


def block_signals() -> None:
    """Thread initializer for the backends' worker threads: leave SIGINT/SIGTERM to the main thread. A
    process-directed Ctrl-C taken by a worker would not interrupt the main thread's wait for input (Python
    runs handlers only on the main thread), and the chat REPL would sit there until the next keystroke."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class Ready:
    """A result that is already there, with the `concurrent.futures.Future.result()` face."""
    __slots__ = ("y",)

    def __init__(self, y: torch.Tensor):
        self.y = y

    def result(self) -> torch.Tensor:
        return self.y


class Pending:
    """A worker's future of y, handed back in the caller's device and dtype."""
    __slots__ = ("fut", "device", "dtype")

    def __init__(self, fut, like: torch.Tensor):
        self.fut, self.device, self.dtype = fut, like.device, like.dtype

    def result(self) -> torch.Tensor:
        return self.fut.result().to(self.device, self.dtype)


class ExpertBackend:
    """submit(layer, x [T,H], ids [T,K], weights [T,K]) -> a future of y [T,H] in x's device and dtype.
    The MoE block submits, computes the shared expert, then waits: a backend with a worker (or a device
    queue) overlaps the two; one without returns `Ready`."""
    name = "base"

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        raise NotImplementedError

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, x, ids, weights).result()

    def close(self) -> None:
        pass


def expert_names(layer: int, e: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}.mlp.experts.{e}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
