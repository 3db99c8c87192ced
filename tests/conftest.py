"""Fixtures shared by the test modules: the test device, the demo checkpoints and their GGUFs, the kernel variants.

The device (the `device` fixture): HK2_TEST_DEVICE=cuda (or cuda:N) runs the device-exercising tests on that GPU,
=cpu on the CPU; unset (or 'auto'): the GPU when torch sees one, else the CPU. Asking for CUDA where there is none
is a usage error (the run stops), never a skip. On CUDA, float32 matmuls run in full float32 (no TF32), so parity
tolerances hold as on the CPU.
"""
import os

import pytest
import torch

from hybrid_k2 import kernels as K
from hybrid_k2._kernels_build import build_shared, simde_include
from hybrid_k2.convert import convert
from hybrid_k2.demo import ensure_demo

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


# ---- the demo checkpoints and their GGUFs (read, never written, by the tests: one copy per run) ----------------
@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The random-weight demo checkpoint (byte-identical on every machine), written into this run's temp dir."""
    return ensure_demo(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def demo_dir(demo):
    """`demo` under the name some modules use."""
    return demo


@pytest.fixture(scope="session")
def demo_ggufs(demo, tmp_path_factory):
    """demo_ggufs(experts, other, trained=False) -> the path of the random-weight demo (trained: the packaged
    trained demo, as ensure_demo() gives it) converted to a GGUF in those formats, once per run."""
    done = {}

    def get(experts: str, other: str, trained: bool = False):
        if (experts, other, trained) not in done:
            out = tmp_path_factory.mktemp("gguf") / f"demo-{experts}.gguf"   # the name summaries show
            convert(ensure_demo() if trained else demo, out, experts=experts, other=other, progress=False)
            done[experts, other, trained] = out
        return done[experts, other, trained]
    return get


# ---- kernel variants: modules that test every ISA mark themselves pytest.mark.usefixtures("kernel_defaults") ---
@pytest.fixture()
def kernel_defaults():
    """Puts the kernels' ISA and thread count back after a test that changes them."""
    isa, threads = K.isa(), K.get_threads()
    yield
    K.set_isa(isa)
    K.set_threads(threads)


@pytest.fixture(scope="session")
def simde_path() -> str:
    """A shared library of the kernels whose AVX-512 code is compiled against SIMDe, so it runs on any CPU."""
    include = simde_include()
    if include is None:
        pytest.fail("SIMDe headers are needed to test the AVX-512 code here: pip install -e '.[test]' brings them "
                    "(simde-py)")
    return build_shared(defines=["HK2_USE_SIMDE"], opt="-O1", include_dirs=[include])  # cached by source hash


@pytest.fixture(scope="session")
def simde_lib(simde_path) -> K.KernelLib:
    return K.KernelLib.open_shared(simde_path)


@pytest.fixture(scope="session")
def variants(simde_lib) -> list[tuple[str, K.KernelLib, str]]:
    """(label, library, isa) for every kernel variant this machine can run."""
    native = K.default_lib()
    out = [("scalar", native, "scalar")]
    for isa in ("avx2", "avx512bw", "avx512vnni"):
        if K.isa_supported(isa):
            out.append((isa, native, isa))
    out += [("simde-avx512bw", simde_lib, "avx512bw"), ("simde-avx512vnni", simde_lib, "avx512vnni")]
    return out
