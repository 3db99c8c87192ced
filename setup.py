from setuptools import find_packages, setup

setup(
    name="hybrid_k2",
    version="0.1.0",
    description="Kimi K2 inference: attention on the accelerator, routed experts on CPU kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["hybrid_k2", "hybrid_k2.*"]),
    package_data={"hybrid_k2": ["demo_model/*"]},   # the trained demo checkpoint, read in place
    setup_requires=["cffi>=1.16"],
    cffi_modules=["hybrid_k2/_kernels_build.py:ffibuilder"],
    install_requires=[
        "torch==2.13.0",   # the CPU wheel on disk; any 2.13 build with CUDA works the same
        "numpy>=1.26",
        "cffi>=1.16",      # C kernel binding (API mode)
        "tiktoken>=0.7",   # Kimi's BPE tokenizer
        "regex>=2023",     # the BPE trainer behind the demo tokenizer (same pattern syntax as tiktoken)
        "gguf>=0.10",      # GGUF reading/writing (llama.cpp's own package)
        "tqdm>=4.66",      # progress bars on loading and conversion
        "jinja2>=3.1.6",   # a checkpoint's own chat template, in jinja's sandbox (older releases have sandbox escapes)
    ],
    extras_require={
        # simde-py: SIMDe headers, so the AVX-512 kernels are tested on CPUs without AVX-512 (no system package)
        "test": ["pytest>=8", "transformers>=4.57", "safetensors>=0.4", "pexpect>=4.9", "jinja2>=3.1",
                 "simde-py>=0.8", "hypothesis>=6",
                 "starlette>=0.40", "uvicorn>=0.30", "llguidance>=1.9", "openai>=3", "httpx2", "jsonschema>=4",
                 "llama-cpp-python>=0.3.10"],   # the reference engine on the same GGUF bytes (built from source)
        # starlette: the ASGI app; uvicorn: its HTTP server; llguidance: grammar masks (no dependencies)
        "server": ["starlette>=0.40", "uvicorn>=0.30", "llguidance>=1.9"],
        "bench": ["llama-cpp-python>=0.3.10", "transformers>=4.57"],   # llama.cpp built from source
    },
    entry_points={"console_scripts": ["hybrid-k2=hybrid_k2.cli:main"]},
    zip_safe=False,
)
