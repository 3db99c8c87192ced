"""Decode/prefill tok/s vs llama.cpp on the same GGUF: see hybrid_k2/versus_llama.py (also `hybrid-k2 bench`)."""
import sys

from hybrid_k2.versus_llama import main

sys.exit(main())
