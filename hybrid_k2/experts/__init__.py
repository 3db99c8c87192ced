"""Routed-expert backends: `forward(layer, x[T,H], ids[T,K], weights[T,K]) -> y[T,H]`.

`torch` is the reference (dequantized weights, torch matmuls on the accelerator); `cpu` runs GGML blocks
in the C kernels. The model calls `run`, which adds the shared expert so a backend can overlap the two.
"""
from __future__ import annotations

import signal
from typing import Callable

import torch


def block_signals() -> None:
    """Thread initializer for the backends' worker threads: leave SIGINT/SIGTERM to the main thread. A
    process-directed Ctrl-C taken by a worker would not interrupt the main thread's wait for input (Python
    runs handlers only on the main thread), and the chat REPL would sit there until the next keystroke."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class ExpertBackend:
    name = "base"

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            shared: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        y = self.forward(layer, x, ids, weights)
        return y if shared is None else y + shared(x)

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start these experts and return a function that waits for their y (expert deferral: the result
        is needed one layer later). Here computed at once; a backend with a worker runs it in the background."""
        y = self.forward(layer, x, ids, weights)
        return lambda: y

    def close(self) -> None:
        pass


def expert_names(layer: int, e: int) -> tuple[str, str, str]:
    p = f"model.layers.{layer}.mlp.experts.{e}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
