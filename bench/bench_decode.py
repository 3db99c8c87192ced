"""Decode/prefill tok/s vs llama.cpp on the same GGUF: see hybrid_k2/bench.py (also `hybrid-k2 bench`)."""
import sys

from hybrid_k2.bench import main

sys.exit(main())
