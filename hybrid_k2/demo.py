"""The `demo` preset: small Kimi-K2-architecture checkpoints in the real formats.

Two of them, both config.json + FP8 e4m3 weights with 128x128 `weight_scale_inv` + BF16 norms, router and
embeddings + fp32 correction bias + tiktoken.model, loaded through the same path as a real checkpoint:

- the trained demo, shipped as package data in hybrid_k2/demo_model (made by bench/train_demo.py on the Python
  standard library's source): what `hybrid_k2.load("demo")` runs. It speaks Python-ish code and its routing
  is learned.
- a random-weight checkpoint (DEMO_CONFIG), written deterministically by `write_demo_checkpoint`: tiny and
  fast to write, used by the tests through `ensure_demo(root)`, and the fallback when the package data is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEMO_VERSION = "1"

DEMO_CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2",
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.827,
    first_k_dense_replace=1, moe_layer_freq=1, rms_norm_eps=1e-6, rope_theta=50000.0,
    max_position_embeddings=131072, hidden_act="silu", tie_word_embeddings=False,
    rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                             weight_block_size=[128, 128]),
)
DEMO_MERGES = 256          # 256 byte tokens + 256 merges = 512 base tokens, then Kimi's 256 special ids


TRAINED_DEMO_DIR = Path(__file__).resolve().parent / "demo_model"


def trained_demo() -> Path | None:
    """The packaged trained checkpoint dir (read in place), or None when this install lacks it."""
    d = TRAINED_DEMO_DIR
    ok = all((d / f).is_file() for f in ("config.json", "model.safetensors", "tiktoken.model"))
    return d if ok else None


def demo_config() -> dict:
    """The config of the checkpoint `hybrid_k2.load("demo")` runs, without writing or loading anything."""
    trained = trained_demo()
    if trained is not None:
        return json.loads((trained / "config.json").read_text())
    return dict(DEMO_CONFIG, vocab_size=256 + DEMO_MERGES + 256)   # bytes + merges, then Kimi's special ids


def cache_dir() -> Path:
    root = os.environ.get("HYBRID_K2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybrid_k2")
    return Path(root)


def ensure_demo(root: Path | None = None) -> Path:
    """The demo checkpoint dir.

    Without `root`: the packaged trained model (hybrid_k2/demo_model) when present, else the random-weight
    checkpoint under cache_dir(). With `root`: always the random-weight checkpoint under root, written first if
    absent (atomic: temp dir, then rename), byte-identical on every machine.
    """
    if root is None:
        trained = trained_demo()
        if trained is not None:
            return trained
    target = (root or cache_dir()) / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(tmp)
        try:
            os.rename(tmp, target)
        except OSError:      # another process won the race; its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus() -> str:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):   # importing `this` prints the Zen
        import this   # its text is stable across Python versions
    zen = "".join(this.d.get(c, c) for c in this.s)
    return zen + "\n" + "def main():\n    print('hello, world')\n    return 0\n" + "你好，世界！Kimi K2 🙂\n"


def write_demo_checkpoint(out: Path) -> None:
    from .bpe_train import train_bpe, write_tiktoken_model
    from .checkpoint.quantize import fp8_block_quantize, save_safetensors
    from .tokenizer import KIMI_PAT_STR

    out.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(_corpus(), 256 + DEMO_MERGES, KIMI_PAT_STR)
    write_tiktoken_model(out / "tiktoken.model", ranks)
    cfg = dict(DEMO_CONFIG, vocab_size=len(ranks) + 256, bos_token_id=len(ranks), eos_token_id=len(ranks) + 1)

    g = torch.Generator().manual_seed(0)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    tensors: dict[str, torch.Tensor] = {}

    def dense(name: str, rows: int, cols: int) -> None:   # FP8 with block scales, as in Kimi-K2-Instruct
        w = torch.randn(rows, cols, generator=g) * cols ** -0.5
        tensors[name + ".weight"], tensors[name + ".weight_scale_inv"] = fp8_block_quantize(w)

    def bf16(name: str, t: torch.Tensor) -> None:
        tensors[name] = t.to(torch.bfloat16)

    def norm(name: str, dim: int) -> None:
        bf16(name + ".weight", 1 + 0.1 * torch.randn(dim, generator=g))

    nh, qk = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    bf16("model.embed_tokens.weight", torch.randn(V, H, generator=g))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm", H)
        norm(p + "post_attention_layernorm", H)
        dense(p + "self_attn.q_a_proj", cfg["q_lora_rank"], H)
        norm(p + "self_attn.q_a_layernorm", cfg["q_lora_rank"])
        dense(p + "self_attn.q_b_proj", nh * qk, cfg["q_lora_rank"])
        dense(p + "self_attn.kv_a_proj_with_mqa", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], H)
        norm(p + "self_attn.kv_a_layernorm", cfg["kv_lora_rank"])
        dense(p + "self_attn.kv_b_proj", nh * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
        dense(p + "self_attn.o_proj", H, nh * cfg["v_head_dim"])
        if i < cfg["first_k_dense_replace"]:
            for proj, (r, c) in dict(gate_proj=(cfg["intermediate_size"], H), up_proj=(cfg["intermediate_size"], H),
                                     down_proj=(H, cfg["intermediate_size"])).items():
                dense(p + "mlp." + proj, r, c)
            continue
        E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        bf16(p + "mlp.gate.weight", torch.randn(E, H, generator=g) * H ** -0.5)
        tensors[p + "mlp.gate.e_score_correction_bias"] = 0.01 * torch.randn(E, generator=g)   # fp32, as in K2
        for prefix in [f"mlp.experts.{e}." for e in range(E)] + ["mlp.shared_experts."]:
            dense(p + prefix + "gate_proj", I, H)
            dense(p + prefix + "up_proj", I, H)
            dense(p + prefix + "down_proj", H, I)
    norm("model.norm", H)
    bf16("lm_head.weight", torch.randn(V, H, generator=g) * H ** -0.5)

    save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
