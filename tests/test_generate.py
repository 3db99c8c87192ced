"""Engine.generate / logits on the demo checkpoint, loaded through the real checkpoint path."""
import json

import pytest
import torch

import hybrid_k2
from hybrid_k2.demo import ensure_demo
from hybrid_k2.generate import ContextOverflowError


@pytest.fixture(scope="module")
def engine(demo):
    return hybrid_k2.load(demo, device="cpu", experts="torch", ctx=256)


def test_demo_checkpoint_is_real_fp8_and_deterministic(tmp_path, engine):
    from hybrid_k2.checkpoint import open_checkpoint
    a, b = ensure_demo(tmp_path / "a"), ensure_demo(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tiktoken.model").read_bytes() == (b / "tiktoken.model").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    with open_checkpoint(a) as ck:
        assert ck.format("model.layers.1.mlp.experts.3.up_proj.weight") == "fp8_block"
        assert ck.format("model.layers.1.mlp.gate.weight") == "bf16"


def test_same_seed_same_output_and_stream_matches(engine):
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    a = engine.generate("Beautiful is better than", **kw)
    b = engine.generate("Beautiful is better than", **kw)
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) > 0
    streamed = "".join(engine.generate("Beautiful is better than", stream=True, **kw))
    assert streamed == a.text
    assert a.stats.prefill_tok_s > 0 and engine.stats.generated_tokens == len(a.token_ids)


def test_greedy_matches_argmax_of_logits(engine):
    prompt = engine.tokenizer.encode("Simple is better than complex.")
    g = engine.generate(prompt, max_new_tokens=6, temperature=0)
    seq = list(prompt)
    for t in g.token_ids:       # each greedy token is the argmax of a fresh full-sequence forward
        logits = engine.logits(seq)[-1]
        logits[engine.suppressed_ids] = float("-inf")    # reserved special ids are never sampled
        assert t == int(logits.argmax())
        seq.append(t)


def test_logits_shape_dtype(engine):
    out = engine.logits([1, 2, 3, 4])
    assert out.shape == (4, engine.cfg.vocab_size) and out.dtype == torch.float32


def test_stop_string_and_chat_prompt(engine):
    free = engine.generate("Errors should", max_new_tokens=40, temperature=0)
    assert len(free.text) > 3
    stop = free.text[2:4]
    cut = engine.generate("Errors should", max_new_tokens=40, temperature=0, stop=stop)
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
    chat = engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=4, seed=1)
    assert chat.finish_reason in ("stop", "length")


def test_stops_on_im_end(engine):
    # a head that always prefers <|im_end|>: generation must stop there without emitting it
    tok, model = engine.tokenizer, engine.model
    saved = model.lm_head
    head = torch.nn.Linear(engine.cfg.hidden_size, engine.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.im_end_id] = 1.0
    model.lm_head = head
    try:
        g = engine.generate("x", max_new_tokens=10, temperature=0)
        assert g.token_ids == [] and g.finish_reason == "stop"
    finally:
        model.lm_head = saved


def test_context_overflow_and_bad_args(engine):
    with pytest.raises(ContextOverflowError, match="context window is 256"):
        engine.generate(list(range(1, 300)), max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([engine.cfg.vocab_size + 5])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", top_p=0)
    with pytest.raises(TypeError, match="prompt must be"):
        engine.generate(3.5)


def test_record_routing_trace(tmp_path):
    import numpy as np
    trace = tmp_path / "trace.npz"
    eng = hybrid_k2.load(ensure_demo(tmp_path / "c"), device="cpu", experts="torch", record_routing=trace)
    g = eng.generate("Now is better than never.", max_new_tokens=8, temperature=0)
    n_prompt = len(eng.tokenizer.encode("Now is better than never."))
    z = np.load(trace)
    cfg = eng.cfg
    # every forwarded token: the prompt, then each generated token except the last (never fed back)
    assert z["ids"].dtype == np.int16
    assert z["ids"].shape == (n_prompt + max(len(g.token_ids) - 1, 0), len(cfg.moe_layers), cfg.num_experts_per_tok)
    assert z["ids"].min() >= 0 and z["ids"].max() < cfg.n_routed_experts
    assert np.allclose(z["weights"].sum(-1), cfg.routed_scaling_factor, atol=1e-4)
    eng.close()


def test_trace_with_router_inputs_replays_in_simulator(tmp_path):
    """record_hidden=True stores router inputs + routers: each layer's router applied to its recorded input
    reproduces the recorded choice, and the simulator replays the predictor from them."""
    import numpy as np
    from hybrid_k2.sim import load_trace, simulate
    trace = tmp_path / "trace.npz"
    eng = hybrid_k2.load(ensure_demo(tmp_path / "c"), device="cpu", experts="torch", record_routing=trace,
                         record_hidden=True)
    eng.generate("Flat is better than nested.", max_new_tokens=6, temperature=0)
    eng.close()
    t = load_trace(trace)
    assert t.hidden.shape[:2] == t.ids.shape[:2] and t.routers.shape[0] == t.ids.shape[1]
    for li in range(t.ids.shape[1]):      # demo: n_group 1, so selection is top-k of sigmoid + bias
        choice = 1 / (1 + np.exp(-t.hidden[:, li] @ t.routers[li].T)) + t.router_bias[li]
        top = np.argsort(-choice, axis=1)[:, :t.ids.shape[2]]
        same = [set(a) == set(b) for a, b in zip(top, t.ids[:, li].tolist())]
        assert np.mean(same) > 0.9            # fp16 router inputs can flip a near tie
    res = simulate(t, slots=8, pcie_gbps=25, ram_gbps=50, policy="lru", lookahead=1)
    assert 0 <= res.hit_rate <= 1 and 1 in res.recall


def test_multi_turn_reuses_prefix_and_matches_fresh(engine):
    msgs = [{"role": "user", "content": "Name a color."}]
    first = engine.generate(msgs, max_new_tokens=6, temperature=0)
    msgs += [{"role": "assistant", "content": first.content}, {"role": "user", "content": "Another?"}]
    second = engine.generate(msgs, max_new_tokens=6, temperature=0)
    assert second.stats.reused_tokens > 0
    engine.reset()
    fresh = engine.generate(msgs, max_new_tokens=6, temperature=0)
    assert fresh.stats.reused_tokens == 0 and fresh.token_ids == second.token_ids
