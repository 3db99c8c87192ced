"""hybrid_k2: Kimi K2 (DeepSeek-V3 architecture) inference with routed experts on CPU kernels."""
from .config import ConfigError, ModelConfig
from .generate import ContextOverflowError, Engine, Generation
from .loader import load

__all__ = ["load", "Engine", "Generation", "ModelConfig", "ConfigError", "ContextOverflowError"]
__version__ = "0.1.0"
