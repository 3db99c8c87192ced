"""Expert deferral: a decoded token's lowest-weighted experts join the residual one layer late. The models run on
the test device (conftest): on CUDA the cpu backend's deferred experts run on its worker while the GPU goes on."""
import pytest
import torch

import hybrid_k2
from hybrid_k2.model import MoE


def reference_decode_step(model, tok: int, pos: int, cache, defer: int) -> torch.Tensor:
    """One decode step spelled out from the model's parts: layer L's deferred experts are added after layer L+1."""
    rope = model._rope[pos:pos + 1]
    h = model.model.embed_tokens(torch.tensor([tok], device=rope.device))
    pending = None
    for layer in model.model.layers:
        a = h + layer.self_attn(layer.input_layernorm(h), pos, rope, cache, True)
        x = layer.post_attention_layernorm(a)
        later = None
        if isinstance(layer.mlp, MoE):
            ids, w = layer.mlp.gate(x)
            w, order = w.sort(dim=-1, descending=True)
            ids, k = ids.gather(-1, order), ids.shape[-1] - defer
            experts = layer.mlp.experts
            out = experts.forward(layer.mlp.layer, x, ids[:, :k], w[:, :k]) + layer.mlp.shared_experts(x)
            if defer:
                later = experts.forward(layer.mlp.layer, x, ids[:, k:], w[:, k:])
        else:
            out = layer.mlp(x)
        h = a + out
        if pending is not None:
            h = h + pending
        pending = later
    if pending is not None:
        h = h + pending
    return model.lm_head(model.model.norm(h)).float()


@pytest.mark.parametrize("defer", [0, 1, 2])
def test_deferral_matches_a_spelled_out_reference(defer, device):
    eng = hybrid_k2.load("demo", device=device, dtype=torch.float32, experts="torch", defer_experts=defer)
    model = eng.model
    prompt = eng.tokenizer.encode("def main():\n    ")
    with torch.inference_mode():
        caches = [model.new_cache(len(prompt) + 4) for _ in range(2)]
        for c in caches:
            model(torch.tensor(prompt, device=device), 0, c)      # prefill is never deferred
        tok, pos = 7, len(prompt)
        for _ in range(3):
            got = model(torch.tensor([tok], device=device), pos, caches[0])[-1]
            want = reference_decode_step(model, tok, pos, caches[1], defer)[-1]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            tok, pos = int(want.argmax()), pos + 1
    eng.close()


def test_deferral_changes_decode_but_not_prefill_and_engine_generates(device):
    plain = hybrid_k2.load("demo", device=device, dtype=torch.float32, experts="cpu")
    late = hybrid_k2.load("demo", device=device, dtype=torch.float32, experts="cpu", defer_experts=1)
    assert plain.experts.overlap == (device.type != "cpu")   # on an accelerator the deferred experts overlap
    ids = plain.tokenizer.encode("import os\n")
    torch.testing.assert_close(plain.logits(ids), late.logits(ids), rtol=0, atol=0)   # prefill: same path
    with torch.inference_mode():
        outs = []
        for eng in (plain, late):
            c = eng.model.new_cache(len(ids) + 1)
            eng.model(torch.tensor(ids[:-1], device=device), 0, c)
            outs.append(eng.model(torch.tensor(ids[-1:], device=device), len(ids) - 1, c)[-1])
    assert not torch.equal(outs[0], outs[1])
    assert late.generate("def ", max_new_tokens=8, temperature=0).text
    plain.close(), late.close()


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True])
def test_bad_defer_value(bad):
    with pytest.raises(ValueError, match="defer_experts"):
        hybrid_k2.load("demo", device="cpu", experts="torch", defer_experts=bad)
