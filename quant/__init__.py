"""Offline conversion: HF DeepSeek-V3 / Kimi K2 checkpoints -> llama.cpp `deepseek2` GGUF files."""
from .convert import EXPERT_FORMATS, OTHER_FORMATS, convert, main

__all__ = ["EXPERT_FORMATS", "OTHER_FORMATS", "convert", "main"]
