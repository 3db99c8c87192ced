"""Parity with HF transformers' DeepseekV3ForCausalLM on tiny random configs, saved with save_pretrained."""
from functools import partial

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import hybrid_k2
from hybrid_k2.runtime import CPURuntime

K2_LIKE = dict(max_position_embeddings=131072, n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=3,
               rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=32.0,
                                    original_max_position_embeddings=4096, beta_fast=1.0, beta_slow=1.0,
                                    mscale=1.0, mscale_all_dim=1.0))
V3_LIKE = dict(max_position_embeddings=163840, n_group=4, topk_group=2, n_routed_experts=16, num_experts_per_tok=4,
               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                    original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                    mscale=1.0, mscale_all_dim=1.0))
NO_Q_LORA = dict(n_group=1, topk_group=1, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=None,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def make_hf_model(tmp_path, variant: dict, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, first_k_dense_replace=1,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              routed_scaling_factor=2.827, max_position_embeddings=4096, rms_norm_eps=1e-6,
              tie_word_embeddings=False, attn_implementation="eager")
    kw.update(variant)
    cfg = DeepseekV3Config(**kw)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.rand_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)     # well separated router scores: top-k must not hinge on rounding
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    return model


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor):
    err = (ours - ref).abs().max().item()
    bound = 1e-4 * ref.abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} exceeds {bound:.3e}"


@pytest.mark.parametrize("variant", [K2_LIKE, V3_LIKE, NO_Q_LORA], ids=["k2_like", "v3_like", "no_q_lora"])
def test_full_sequence_and_decode_match_hf(tmp_path, variant, device):
    """The reference runs on the CPU; our model on the test device (float32; TF32 off on CUDA, see conftest)."""
    hf = make_hf_model(tmp_path, variant)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()

    engine = hybrid_k2.load(tmp_path, device=device, dtype=torch.float32, experts="torch")
    assert engine.device == device
    assert_close_logits(engine.logits(ids.tolist()), ref)

    # token-by-token through the latent cache and the absorbed attention: in torch ops (autograd on) and in
    # the CPU runtime's C decode step (hk2_attn_decode, taken when autograd is off on the CPU)
    model = engine.model
    ids = ids.to(device)
    for mode, fused in ((torch.enable_grad, False), (torch.no_grad, device.type == "cpu")):
        model.set_runtime(partial(CPURuntime.build, torch_experts=True) if fused else None)
        with mode():
            cache = model.new_cache(len(ids))
            steps = [model(ids[i:i + 1], i, cache) for i in range(len(ids))]
        assert_close_logits(torch.cat(steps).detach().cpu(), ref)
        assert (model.runtime is not None) == fused
    model.set_runtime(None)

    # chunked prefill (expanded path over cached latents) then absorbed decode
    with torch.no_grad():
        cache = model.new_cache(len(ids))
        first = model(ids[:25], 0, cache)
        rest = [model(ids[i:i + 1], i, cache) for i in range(25, len(ids))]
    assert_close_logits(torch.cat([first] + rest).cpu(), ref)


def test_router_selects_with_bias_but_weights_without(tmp_path):
    from hybrid_k2.config import ModelConfig
    from hybrid_k2.model import Router
    cfg = ModelConfig.from_dict(dict(vocab_size=8, hidden_size=4, intermediate_size=8, moe_intermediate_size=4,
                                     num_hidden_layers=2, num_attention_heads=1, kv_lora_rank=4,
                                     qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4,
                                     n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=2.0))
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    ids, w = r(x)
    assert sorted(ids[0].tolist()) == [0, 3]          # the bias pulls expert 3 in
    s = torch.sigmoid(torch.tensor([3.0, 0.0]))        # ...but weights come from the raw scores
    torch.testing.assert_close(w[0].sort().values, (2.0 * s / s.sum()).sort().values)
