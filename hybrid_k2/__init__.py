"""hybrid_k2: Kimi K2 (DeepSeek-V3 architecture) inference with routed experts on CPU kernels."""
import importlib

# Exports resolve on first use, so `hybrid-k2` (hybrid_k2.cli) handles Ctrl-C/SIGTERM before torch is imported.
_EXPORTS = {"load": ".loader", "Engine": ".generate", "Generation": ".generate",
            "ContextOverflowError": ".generate", "ModelConfig": ".config", "ConfigError": ".config"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybrid_k2' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
