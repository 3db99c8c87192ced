"""Loading streams tensor by tensor: peak RSS stays within ~1.2x of the weights it keeps resident."""
import json
import subprocess
import sys
import textwrap

import torch

from hybrid_k2.checkpoint.quantize import fp8_block_quantize, write_sharded
from hybrid_k2.demo import DEMO_CONFIG


def test_peak_rss_while_loading_fp8_checkpoint(tmp_path):
    cfg = dict(DEMO_CONFIG, hidden_size=512, moe_intermediate_size=512, n_routed_experts=32, num_hidden_layers=4,
               vocab_size=1024, bos_token_id=None, eos_token_id=None)
    g = torch.Generator().manual_seed(0)
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    nh, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    t = {}

    def lin(name, r, c):
        t[name + ".weight"], t[name + ".weight_scale_inv"] = fp8_block_quantize(torch.randn(r, c, generator=g))

    t["model.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], H, generator=g).bfloat16()
    t["lm_head.weight"] = torch.randn(cfg["vocab_size"], H, generator=g).bfloat16()
    t["model.norm.weight"] = torch.ones(H).bfloat16()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[p + n + ".weight"] = torch.ones(H).bfloat16()
        t[p + "self_attn.q_a_layernorm.weight"] = torch.ones(cfg["q_lora_rank"]).bfloat16()
        t[p + "self_attn.kv_a_layernorm.weight"] = torch.ones(cfg["kv_lora_rank"]).bfloat16()
        lin(p + "self_attn.q_a_proj", cfg["q_lora_rank"], H)
        lin(p + "self_attn.q_b_proj", nh * (dn + dr), cfg["q_lora_rank"])
        lin(p + "self_attn.kv_a_proj_with_mqa", cfg["kv_lora_rank"] + dr, H)
        lin(p + "self_attn.kv_b_proj", nh * (dn + dv), cfg["kv_lora_rank"])
        lin(p + "self_attn.o_proj", H, nh * dv)
        if i == 0:
            for n, (r, c) in dict(gate_proj=(512, H), up_proj=(512, H), down_proj=(H, 512)).items():
                lin(p + "mlp." + n, r, c)
            continue
        t[p + "mlp.gate.weight"] = torch.randn(E, H, generator=g).bfloat16()
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(E)
        for pre in [f"mlp.experts.{e}." for e in range(E)] + ["mlp.shared_experts."]:
            lin(p + pre + "gate_proj", I, H)
            lin(p + pre + "up_proj", I, H)
            lin(p + pre + "down_proj", H, I)
    write_sharded(tmp_path, t, max_shard_bytes=32 << 20)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del t

    script = textwrap.dedent(f"""
        import resource, torch, hybrid_k2
        def rss_peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = rss_peak()
        e = hybrid_k2.load({str(tmp_path)!r}, device="cpu", dtype=torch.float32, experts="torch", progress=False)
        resident = sum(p.numel() * p.element_size() for p in e.model.parameters())
        resident += sum(w.numel() * w.element_size() for ws in e.experts.layers.values() for w in ws)
        print(base, rss_peak(), resident)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, peak, resident = map(int, out)
    assert resident > 150e6            # the experts dominate, as in K2
    assert peak - base <= 1.2 * resident, f"peak grew {(peak - base) / 1e6:.0f} MB for {resident / 1e6:.0f} MB of weights"
