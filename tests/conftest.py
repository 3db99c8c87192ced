"""The device the device-exercising tests run on (the `device` fixture).

HK2_TEST_DEVICE=cuda (or cuda:N) runs them on that GPU, =cpu on the CPU; unset (or 'auto'): the GPU when torch
sees one, else the CPU. Asking for CUDA where there is none is a usage error (the run stops), never a skip.
On CUDA, float32 matmuls run in full float32 (no TF32), so parity tolerances hold as on the CPU.
"""
import os

import pytest
import torch

ENV = "HK2_TEST_DEVICE"


def resolve_device(value: str | None) -> torch.device:
    """The test device for a value of HK2_TEST_DEVICE; ValueError for one that cannot be honoured."""
    v = (value or "").strip().lower()
    if v in ("", "auto"):
        v = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(v)
    except RuntimeError as e:
        raise ValueError(f"{ENV}={value!r} is not a device name (expected cpu, cuda, cuda:N or auto): {e}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"{ENV}={value!r}: the tests run on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"{ENV}={value!r} but torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); unset it to run on the CPU")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"{ENV}={value!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)   # with its index: tensors report cuda:N, and compare equal to it


def pytest_configure(config):
    try:
        dev = resolve_device(os.environ.get(ENV))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False   # float32 parity: full-precision products
        torch.backends.cudnn.allow_tf32 = False
    config.hk2_device = dev


def pytest_report_header(config):
    dev = config.hk2_device
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return (f"hk2 test device: {dev} ({p.name}, capability {p.major}.{p.minor}, "
                f"{p.total_memory / 2**30:.0f} GiB), TF32 off; torch {torch.__version__}")
    return f"hk2 test device: cpu (set {ENV}=cuda for a GPU); torch {torch.__version__}"


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the accelerator side of a test runs on: cpu, or cuda:N (see the module docstring)."""
    return pytestconfig.hk2_device


def sync(device) -> None:
    """Wait for every queued kernel and copy on `device` (all its streams); nothing to do on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
