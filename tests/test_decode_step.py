"""CPUDecodeStep: a one-token CPU step as fixed C calls gives the module path's logits and cache bit for bit,
is rebuilt when what it read changes, and stands aside where it does not apply."""
import copy

import pytest
import torch
from torch import nn

import hybrid_k2
from hybrid_k2 import kernels
from hybrid_k2.decode_step import CPUDecodeStep
from hybrid_k2.demo import ensure_demo
from hybrid_k2.model import KVCache
from hybrid_k2.convert import convert
from test_model_parity import NO_Q_LORA, make_hf_model


@pytest.fixture(scope="module")
def demo_gguf(demo_ggufs):
    """The demo (query LoRA, a dense first layer, MoE layers with a shared expert) as a GGUF."""
    return demo_ggufs("q4_0", "q8_0")


def decode(model, cache, tokens, start: int, use_step: bool) -> torch.Tensor:
    model.decode_step = use_step
    dev = model.model.embed_tokens.weight.device
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([t], device=dev), start + i, cache, last_only=True)
                          for i, t in enumerate(tokens)])


def prefilled(model, prompt):
    cache = model.new_cache(64)
    with torch.inference_mode():
        model(torch.tensor(prompt, device=model.model.embed_tokens.weight.device), 0, cache)
    return cache


def check_same_as_modules(model, prompt, tokens):
    a, b = prefilled(model, prompt), prefilled(model, prompt)
    fast = decode(model, a, tokens, len(prompt), True)
    assert isinstance(model._step[1], CPUDecodeStep), "the fixed-call step was not taken"
    slow = decode(model, b, tokens, len(prompt), False)
    assert torch.equal(fast, slow)
    assert torch.equal(a.kv, b.kv) and torch.equal(a.pe, b.pe)


def test_demo_step_is_the_module_path_bit_for_bit(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    check_same_as_modules(eng.model, list(range(5, 17)), [40, 41, 7, 300, 2])
    # Engine.generate takes it too, and picks the same tokens as the module path
    fast = eng.generate([5, 6, 7, 8], max_new_tokens=8, temperature=0).token_ids
    assert isinstance(eng.model._step[1], CPUDecodeStep)
    eng.model.decode_step = False
    eng.reset()   # (else the prompt's KV rows would be reused from the first run)
    assert eng.generate([5, 6, 7, 8], max_new_tokens=8, temperature=0).token_ids == fast
    eng.close()


def test_without_query_lora_and_with_float_kv_b(tmp_path):
    """q_proj in place of q_a/q_b, and nope = 16 (not a Q8_0 row): kv_b stays float32 for the decode step."""
    make_hf_model(tmp_path, NO_Q_LORA)
    eng = hybrid_k2.load(tmp_path, device="cpu", dtype=torch.float32, experts="cpu", dense_format="q8_0")
    assert all(layer.self_attn.kv_b_blocks is None for layer in eng.model.model.layers)
    check_same_as_modules(eng.model, [3, 1, 4, 1, 5, 9], [2, 6, 5, 3])
    eng.close()


def same_experts(model, layer: int):
    """A new ExpertWeights over the same blocks as the CPU backend's layer."""
    w = model.model.layers[layer].mlp.experts.layers[layer]
    return kernels.ExpertWeights(w.blocks("gate"), w.blocks("up"), w.blocks("down"), w.gate_type, w.up_type, w.down_type)


def test_rebuilt_when_what_it_read_changes(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    model, prompt = eng.model, [5, 6, 7, 8]
    check_same_as_modules(model, prompt, [9, 10])
    first = model._step[1]
    norm = model.model.layers[1].post_attention_layernorm
    norm.weight.data = norm.weight.data * 1.5           # new memory: the old pointer would read freed storage
    check_same_as_modules(model, prompt, [9, 10])
    assert model._step[1] is not first
    second = model._step[1]
    head = model.lm_head                                # new blocks for a matrix
    head.set_blocks(head.blocks.copy())
    check_same_as_modules(model, prompt, [9, 10])
    assert model._step[1] is not second
    # a new Parameter object (the old one stays alive, so its memory did not move), a replaced module, a
    # replaced expert layer of the CPU backend: each makes a new step that reads what the modules read
    for change in (lambda: setattr(norm, "weight", nn.Parameter(norm.weight.detach() * 3, requires_grad=False)),
                   lambda: setattr(model.model.layers[0], "input_layernorm", copy.deepcopy(model.model.layers[0].input_layernorm)),
                   lambda: model.model.layers[2].mlp.experts.layers.__setitem__(2, same_experts(model, 2))):
        before = model._step[1]
        keep = (norm.weight, model.model.layers[0].input_layernorm)   # alive, as a user's references would be
        change()
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight.mul_(1.01)   # differs from the kept copy's values
        check_same_as_modules(model, prompt, [9, 10])
        assert model._step[1] is not before
        del keep
    eng.close()


def test_stands_aside_where_it_does_not_apply(demo_gguf):
    # float matrices: the module path's torch ops
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="float")
    decode(eng.model, prefilled(eng.model, [5, 6, 7]), [8], 3, True)
    assert eng.model._step[1] is None
    eng.close()
    # a routing recorder needs the module path's MoE.forward: it sees every decode step
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    seen = []

    class Recorder:
        def record(self, layer, ids, weights, x):
            seen.append(layer)

    eng.model.set_recorder(Recorder())
    decode(eng.model, prefilled(eng.model, [5, 6, 7]), [8, 9], 3, True)
    assert eng.model._step[1] is None and seen.count(eng.cfg.moe_layers[0]) == 3   # prefill + 2 decode steps
    eng.model.set_recorder(None)
    decode(eng.model, prefilled(eng.model, [5, 6, 7]), [8], 3, True)
    assert isinstance(eng.model._step[1], CPUDecodeStep)
    # with autograd on, the module path (torch ops that track gradients)
    eng.model._step = (None, None)
    with torch.enable_grad():
        eng.model.decode_step = True
        cache = eng.model.new_cache(8)
        eng.model(torch.tensor([5]), 0, cache)
    assert eng.model._step == (None, None)
    eng.close()


def test_model_on_the_test_device_decodes_through_the_modules(tmp_path, device):
    """The fixed-call step serves a float32 model whose matrices are GGML blocks on the CPU. The same GGUF on the
    test device with float dense matrices (what an accelerator holds: the file's blocks dequantized at load)
    decodes through the modules instead, and agrees with the step's engine to the dense blocks' 8-bit
    activation rounding (the trained demo, measured on the CPU: top-1 1.00, median relative error 0.24%, max 5%;
    the random-weight demo's flat logits would make this 0.78 and 8%)."""
    path = convert(ensure_demo(), tmp_path / "trained.gguf", experts="q4_0", other="q8_0", progress=False)
    ref = hybrid_k2.load(path, device="cpu", experts="cpu", dense_format="native")
    eng = hybrid_k2.load(path, device=device, dtype=torch.float32, experts="cpu", dense_format="float")
    prompt = ref.tokenizer.encode("def main(args):\n    ")
    tokens = ref.generate(prompt, max_new_tokens=24, temperature=0).token_ids
    want = decode(ref.model, prefilled(ref.model, prompt), tokens, len(prompt), True)
    assert isinstance(ref.model._step[1], CPUDecodeStep)
    got = decode(eng.model, prefilled(eng.model, prompt), tokens, len(prompt), True).cpu()
    assert eng.model._step[1] is None and eng.model.model.embed_tokens.weight.device == device
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert float(rel.median()) < 0.02 and float(rel.max()) < 0.2
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.9
    ref.close(), eng.close()


def test_bad_token_and_position(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    model = eng.model
    cache = prefilled(model, [5, 6])
    decode(model, cache, [7], 2, True)
    step = model._step[1]
    with pytest.raises(ValueError, match="token id 99999 is not in"):
        step(cache, 99999, 3)
    with pytest.raises(ValueError, match=r"position 64 is outside the cache and RoPE table \(64 positions\)"):
        step(cache, 7, 64)
    # a cache longer than the model's RoPE table (made directly): the table bounds the position, as the module
    # path's rot check does
    long = KVCache(model.cfg, model._rope.shape[0] + 100, "cpu", torch.float32)
    with pytest.raises(ValueError, match="outside the cache and RoPE table"):
        decode(model, long, [7], model._rope.shape[0] + 10, True)
    with pytest.raises(ValueError):
        decode(model, long, [7], model._rope.shape[0] + 10, False)
    eng.close()
