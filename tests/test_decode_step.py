"""CPURuntime: a one-token CPU step as fixed C calls, built once from the loaded weights, agrees with the
reference modules (exactly up to float rounding for float32 matrices; to the 8-bit activation rounding of the
dense blocks otherwise), is built again by the set_* methods, and stands aside where it does not apply."""
from functools import partial

import pytest
import torch

import hybrid_k2
from hybrid_k2.demo import ensure_demo
from hybrid_k2.model import KVCache
from hybrid_k2.runtime import CPURuntime
from test_model_parity import NO_Q_LORA, assert_close_logits, make_hf_model


@pytest.fixture(scope="module")
def demo_gguf(demo_ggufs):
    """The demo (query LoRA, a dense first layer, MoE layers with a shared expert) as a GGUF."""
    return demo_ggufs("q4_0", "q8_0")


def decode(model, cache, tokens, start: int, use_runtime: bool) -> torch.Tensor:
    model.set_runtime(partial(CPURuntime.build, torch_experts=True) if use_runtime else None)
    dev = model.model.embed_tokens.weight.device
    with torch.inference_mode():
        out = torch.cat([model(torch.tensor([t], device=dev), start + i, cache, last_only=True)
                         for i, t in enumerate(tokens)])
    assert (model.runtime is not None) == use_runtime
    return out


def prefilled(model, prompt):
    cache = model.new_cache(64)
    with torch.inference_mode():
        model(torch.tensor(prompt, device=model.model.embed_tokens.weight.device), 0, cache)
    return cache


def runtime_and_modules(model, prompt, tokens):
    """(runtime logits, module logits, runtime cache, module cache) for the same decode steps."""
    a, b = prefilled(model, prompt), prefilled(model, prompt)
    fast = decode(model, a, tokens, len(prompt), True)
    slow = decode(model, b, tokens, len(prompt), False)
    model.set_runtime(CPURuntime.build)
    return fast, slow, a, b


def check_close_to_modules(model, prompt, tokens):
    """GGML dense blocks: each path quantizes its own (equal up to rounding) activations to 8 bits."""
    fast, slow, a, b = runtime_and_modules(model, prompt, tokens)
    rel = (fast - slow).norm(dim=1) / slow.norm(dim=1)
    assert float(rel.max()) < 0.03, rel
    assert torch.equal(fast.argmax(1), slow.argmax(1))
    assert float((a.kv - b.kv).norm() / b.kv.norm()) < 0.03 and float((a.pe - b.pe).norm() / b.pe.norm()) < 0.03


def test_demo_runtime_matches_the_modules(demo_gguf, demo_ggufs):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    check_close_to_modules(eng.model, list(range(5, 17)), [40, 41, 7, 300, 2])
    assert isinstance(eng.model.runtime, CPURuntime)   # the loader installs it
    eng.close()
    # Engine.generate takes it too, and picks the same tokens as the module path (the trained demo: the random
    # one's flat logits tie within the 8-bit rounding)
    eng = hybrid_k2.load(demo_ggufs("q4_0", "q8_0", trained=True), device="cpu")
    fast = eng.generate([5, 6, 7, 8], max_new_tokens=8, temperature=0).token_ids
    eng.model.set_runtime(None)
    eng.reset()   # (else the prompt's KV rows would be reused from the first run)
    assert eng.generate([5, 6, 7, 8], max_new_tokens=8, temperature=0).token_ids == fast
    eng.close()


def test_float_matrices_are_the_modules_to_rounding(tmp_path):
    """Float32 dense matrices and the reference's float32 experts, read in place as F32 rows: the same
    arithmetic as the modules, so only the summation order differs."""
    make_hf_model(tmp_path, NO_Q_LORA)
    eng = hybrid_k2.load(tmp_path, device="cpu", dtype=torch.float32, experts="torch")
    assert eng.model.runtime is None                   # the reference stays torch ops...
    fast, slow, a, b = runtime_and_modules(eng.model, [3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8])   # ...unless asked
    assert_close_logits(fast, slow)
    torch.testing.assert_close(a.kv, b.kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pe, b.pe, rtol=1e-5, atol=1e-5)
    eng.close()


def test_without_query_lora_and_with_float_kv_b(tmp_path):
    """q_proj in place of q_a/q_b, and nope = 16 (not a Q8_0 row): kv_b stays float32 for the runtime."""
    make_hf_model(tmp_path, NO_Q_LORA)
    eng = hybrid_k2.load(tmp_path, device="cpu", dtype=torch.float32, experts="cpu", dense_format="q8_0")
    assert all(layer.self_attn.kv_b_blocks is None for layer in eng.model.model.layers)
    check_close_to_modules(eng.model, [3, 1, 4, 1, 5, 9], [2, 6, 5, 3])
    eng.close()


def test_built_again_by_the_set_methods_and_set_runtime(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    model, prompt = eng.model, [5, 6, 7, 8]
    eng.generate(prompt, max_new_tokens=2, temperature=0)
    first = model.runtime
    model.set_experts(eng.experts)
    assert model.runtime is not None and model.runtime is not first
    # weights changed another way: set_runtime reads them again, and agrees with the modules on them
    norm = model.model.layers[1].post_attention_layernorm
    norm.weight.data = norm.weight.data * 1.5
    model.set_runtime(CPURuntime.build)
    check_close_to_modules(model, prompt, [9, 10])
    eng.close()


def test_stands_aside_where_it_does_not_apply(demo_gguf):
    # a routing recorder needs the modules' MoE.forward: it sees every decode step
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    seen = []

    class Recorder:
        def record(self, layer, ids, weights, x):
            seen.append(layer)

    eng.model.set_recorder(Recorder())
    assert eng.model.runtime is None
    cache = prefilled(eng.model, [5, 6, 7])
    with torch.inference_mode():
        for i, t in enumerate([8, 9]):
            eng.model(torch.tensor([t]), 3 + i, cache)
    assert eng.model.runtime is None and seen.count(eng.cfg.moe_layers[0]) == 3   # prefill + 2 decode steps
    eng.model.set_recorder(None)
    assert isinstance(eng.model.runtime, CPURuntime)
    # with autograd on, the modules (torch ops that track gradients): the runtime's buffers stay untouched
    with torch.enable_grad():
        cache = eng.model.new_cache(8)
        eng.model.runtime.x.fill_(7.0)
        eng.model(torch.tensor([5]), 0, cache)
        assert torch.all(eng.model.runtime.x == 7.0)
    eng.close()
    # deferral: the modules' MoE blocks hand experts on
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", defer_experts=1)
    assert eng.model.runtime is None
    eng.close()


def test_model_on_the_test_device_decodes_through_the_modules(tmp_path, device, demo_ggufs):
    """The runtime serves a float32 model on the CPU. The same GGUF on the test device with float dense matrices
    (what an accelerator holds: the file's blocks dequantized at load) decodes through the modules when that
    device is not the CPU, and agrees with the runtime's engine to the dense blocks' 8-bit activation rounding."""
    path = demo_ggufs("q4_0", "q8_0", trained=True)
    ref = hybrid_k2.load(path, device="cpu", experts="cpu", dense_format="native")
    eng = hybrid_k2.load(path, device=device, dtype=torch.float32, experts="cpu", dense_format="float")
    prompt = ref.tokenizer.encode("def main(args):\n    ")
    tokens = ref.generate(prompt, max_new_tokens=24, temperature=0).token_ids
    want = decode(ref.model, prefilled(ref.model, prompt), tokens, len(prompt), True)
    eng.model.set_runtime(None)
    got = decode(eng.model, prefilled(eng.model, prompt), tokens, len(prompt), False).cpu()
    assert eng.model.model.embed_tokens.weight.device == device
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert float(rel.median()) < 0.02 and float(rel.max()) < 0.2
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.9
    ref.close(), eng.close()


def test_bad_token_and_position(demo_gguf):
    eng = hybrid_k2.load(demo_gguf, device="cpu", experts="cpu", dense_format="native")
    model = eng.model
    cache = prefilled(model, [5, 6])
    decode(model, cache, [7], 2, True)
    step = model.runtime
    with pytest.raises(ValueError, match="token id 99999 is not in"):
        step(torch.tensor([99999]), 3, cache)
    with pytest.raises(ValueError, match=r"position 64 is outside the cache and RoPE table \(64 positions\)"):
        step(torch.tensor([7]), 64, cache)
    # a cache longer than the model's RoPE table (made directly): the table bounds the position, as the module
    # path's rot check does
    long = KVCache(model.cfg, model._rope.shape[0] + 100, "cpu", torch.float32)
    with pytest.raises(ValueError, match="outside the cache and RoPE table"):
        decode(model, long, [7], model._rope.shape[0] + 10, True)
    with pytest.raises(ValueError):
        decode(model, long, [7], model._rope.shape[0] + 10, False)
    eng.close()
