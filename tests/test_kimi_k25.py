"""Kimi K2.5 / K2.6 / K2.7 checkpoints (KimiK25ForConditionalGeneration): the text model read through the nested
config (model_type kimi_k25, text_config kimi_k2, vision_config beside it) and the prefixed tensor names the tools
write, the vision tower and projector skipped with one notice, INT4 / FP8 / BF16 weights; and `hybrid-k2 convert`.

The reference is HF transformers' DeepseekV3ForCausalLM loaded (from_pretrained) from a K2-layout checkpoint of
the same weights, dequantized as the compressed-tensors / FP8 descriptions define them."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file
from transformers import DeepseekV3ForCausalLM

import hybrid_k2
from hybrid_k2.checkpoint import CheckpointConfigError, CheckpointError, HFCheckpoint
from hybrid_k2.checkpoint.gguf import GGUFCheckpoint
from hybrid_k2.checkpoint.hf import IMAGES_NOTICE, text_model_name
from hybrid_k2.checkpoint.quantize import fp8_block_quantize, int4_group_quantize, save_safetensors, write_sharded
from hybrid_k2.config import ConfigError, ModelConfig
from hybrid_k2.convert import convert
from test_checkpoint import fp8_reference, int4_reference
from test_gguf import TEXT, train_ranks, write_tokenizer
from test_model_parity import K2_LIKE, assert_close_logits, make_hf_model

INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*",
                   "re:vision_tower.*", "re:mm_projector.*"]}
FP8_BLOCK = [16, 16]   # not the default 128 x 128: the reader must take it from the wrapper's quantization_config
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": FP8_BLOCK}
# where each layout puts the text model's tensors and the vision parts
LAYOUTS = {
    # Moonshot's own files: the causal LM under language_model.
    "moonshot": (lambda n: "language_model." + n, "vision_tower.", "mm_projector."),
    # transformers' composite layout: the decoder under model.language_model., lm_head at the top
    "transformers": (lambda n: n if n.startswith("lm_head.") else "model.language_model." + n[len("model."):],
                     "model.vision_tower.", "model.multi_modal_projector."),
    # exports that drop the causal LM's `model.` level (nvidia's NVFP4 files)
    "bare": (lambda n: "language_model." + (n[len("model."):] if n.startswith("model.") else n),
             "vision_tower.", "mm_projector."),
}


def vision_tensors(tower: str, projector: str) -> dict[str, torch.Tensor]:
    """A small MoonViT-shaped tower and projector; one int64 table too, which nothing may try to read as a weight."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    t = {tower + "patch_embed.proj.weight": r(32, 3, 14, 14), tower + "patch_embed.pos_emb.weight": r(16, 16, 32),
         tower + "patch_embed.grid_ids": torch.arange(16, dtype=torch.int64),
         tower + "encoder.final_layernorm.weight": r(32)}
    for i in range(2):
        b = f"{tower}encoder.blocks.{i}."
        t.update({b + "wqkv.weight": r(96, 32), b + "wo.weight": r(32, 32), b + "norm0.weight": r(32),
                  b + "mlp.fc0.weight": r(128, 32), b + "mlp.fc1.weight": r(32, 128)})
    t.update({projector + "pre_norm.weight": r(128), projector + "proj.0.weight": r(128, 128),
              projector + "proj.2.weight": r(64, 128)})
    return t


def text_config(base: int, vocab: int) -> dict:
    """The Kimi K2 config.json keys for make_hf_model's K2_LIKE model (what K2.5 nests as text_config)."""
    return dict(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], vocab_size=vocab, hidden_size=64,
                intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=1,
                topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=2.827, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=48,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, hidden_act="silu",
                rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=131072,
                rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                  beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                bos_token_id=base, eos_token_id=base + 1, tie_word_embeddings=False, num_nextn_predict_layers=0)


def k25_config(text: dict, quant: dict | None) -> dict:
    d = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
         "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"}, "media_placeholder_token_id": 163605,
         "text_config": text, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "vision_config": {"model_type": "moonvit", "patch_size": 14, "init_pos_emb_height": 16, "hidden_size": 32,
                           "num_attention_heads": 2, "num_hidden_layers": 2, "merge_kernel_size": [2, 2],
                           "mm_hidden_size": 32, "text_hidden_size": 64}}
    if quant is not None:
        d["quantization_config"] = quant
    return d


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def is_fp8_matrix(name: str) -> bool:
    """The matrices Kimi-K2-Instruct stores in FP8: all 2-D Linear weights but the embedding, lm_head, router."""
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints of one random K2_LIKE model: `ref_*` the K2 layout of the dequantized weights (the reference
    reads them), `k2_int4` the Kimi-K2-Thinking layout (flat config, INT4 experts), `k25_*` the K2.5 layouts."""
    root = tmp_path_factory.mktemp("k25")
    tok = str(root / "tok")
    os.makedirs(tok)
    ranks = train_ranks(TEXT, 60)
    base = len(ranks)
    write_tokenizer(tok, ranks)
    vocab = base + 256
    make_hf_model(root / "src", dict(K2_LIKE, vocab_size=vocab))   # saved in the K2 layout, per-expert names
    src = load_file(str(root / "src" / "model.safetensors"))
    hf_config = json.loads((root / "src" / "config.json").read_text())
    text = text_config(base, vocab)
    dirs = {}

    def directory(name, tensors, config, shard_bytes=1 << 18):
        d = str(root / name)
        write_sharded(d, tensors, shard_bytes)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        for f in ("tiktoken.model", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok, f), d)
        dirs[name] = d

    # INT4 experts (compressed-tensors pack-quantized, group 32) and what they decode to
    int4, deq4 = {}, {}
    for n, w in src.items():
        if is_routed_expert(n):
            packed, scale, shape = int4_group_quantize(w, 32)
            base_name = n[: -len("weight")]
            int4.update({base_name + "weight_packed": packed, base_name + "weight_scale": scale,
                         base_name + "weight_shape": shape})
            deq4[n] = int4_reference(packed, scale, *w.shape, 32)[0]
        else:
            int4[n] = w.to(torch.bfloat16)
            deq4[n] = int4[n].float()
    # FP8 block matrices, the rest BF16
    fp8, deq8 = {}, {}
    for n, w in src.items():
        if is_fp8_matrix(n):
            q, s = fp8_block_quantize(w, tuple(FP8_BLOCK))
            fp8.update({n: q, n + "_scale_inv": s})
            deq8[n] = fp8_reference(q, s, *FP8_BLOCK)
        else:
            fp8[n] = w.to(torch.bfloat16)
            deq8[n] = fp8[n].float()
    bf16 = {n: w.to(torch.bfloat16) for n, w in src.items()}

    directory("ref_int4", deq4, hf_config)
    directory("ref_fp8", deq8, hf_config)
    directory("ref_bf16", {n: w.float() for n, w in bf16.items()}, hf_config)
    directory("k2_int4", int4, {**text, "quantization_config": INT4})

    def k25(name, tensors, layout, config):
        rename, tower, projector = LAYOUTS[layout]
        t = {rename(n): w for n, w in tensors.items()}
        t.update(vision_tensors(tower, projector))
        directory(name, t, config)

    k25("k25_int4", int4, "moonshot", k25_config(text, INT4))   # quantization_config beside text_config
    # text_config's own quantization_config wins over the wrapper's (here a wrong group size)
    k25("k25_int4_transformers", int4, "transformers",
        k25_config({**text, "quantization_config": INT4},
                   {**INT4, "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                       "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}}}}))
    k25("k25_int4_bare", int4, "bare", k25_config(text, INT4))
    k25("k25_fp8", fp8, "moonshot", k25_config(text, FP8))
    k25("k25_bf16", bf16, "moonshot", k25_config(text, None))
    dirs["vocab"] = vocab
    return dirs


_refs = {}


def reference_logits(ckpts, kind: str, ids: list[int]) -> torch.Tensor:
    if kind not in _refs:
        _refs[kind] = DeepseekV3ForCausalLM.from_pretrained(ckpts[f"ref_{kind}"], dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        return _refs[kind](torch.tensor([ids])).logits[0].float()


def prompt(ckpts, n: int = 40, seed: int = 1) -> list[int]:
    return torch.randint(0, ckpts["vocab"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if IMAGES_NOTICE in r.getMessage()]


# ---- config ------------------------------------------------------------------------------------------
def test_nested_config_reads_the_text_model(ckpts):
    k25 = ModelConfig.from_json(ckpts["k25_int4"])
    assert k25.replace(source="x") == ModelConfig.from_json(ckpts["k2_int4"]).replace(source="x")
    assert k25.replace(source="x") == ModelConfig.from_json(ckpts["ref_int4"]).replace(
        source="x", model_type="kimi_k2", bos_token_id=k25.bos_token_id, eos_token_id=k25.eos_token_id)
    assert k25.model_type == "kimi_k2" and "text_config" in k25.source
    # token ids and the embedding tie may sit on the wrapper only; text_config's own win
    d = k25_config({k: v for k, v in text_config(300, 556).items() if k not in ("bos_token_id", "eos_token_id")},
                   None)
    d.update(bos_token_id=301, eos_token_id=302)
    cfg = ModelConfig.from_dict(d, source="c.json")
    assert (cfg.bos_token_id, cfg.eos_token_id) == (301, 302)
    d["text_config"]["eos_token_id"] = 303
    assert ModelConfig.from_dict(d, source="c.json").eos_token_id == 303
    # a deepseek_v3 text_config, and any wrapper holding one
    d = k25_config(dict(text_config(300, 556), model_type="deepseek_v3"), None)
    d["model_type"] = "some_vlm"
    assert ModelConfig.from_dict(d, source="c.json").model_type == "deepseek_v3"


@pytest.mark.parametrize("change,field,match", [
    (lambda d: d.pop("text_config"), "text_config", r"c\.json: model_type 'kimi_k25' keeps the language model's "
                                                    r"config under 'text_config', which is missing"),
    (lambda d: d.update(text_config=None), "text_config", "'text_config', which is missing"),
    (lambda d: d.update(text_config="kimi_k2"), "text_config", "field 'text_config' must be an object, got str"),
    (lambda d: d.update(text_config=[1, 2]), "text_config", "field 'text_config' must be an object, got list"),
    (lambda d: d["text_config"].update(model_type="qwen2"), "text_config.model_type",
     "field 'text_config.model_type' 'qwen2' is not supported"),
    (lambda d: d["text_config"].pop("kv_lora_rank"), "text_config.kv_lora_rank",
     r"c\.json \(text_config\): required field 'kv_lora_rank' is missing"),
    (lambda d: d["text_config"].update(hidden_size="64"), "text_config.hidden_size",
     r"c\.json \(text_config\): field 'hidden_size' must be an integer"),
    (lambda d: d["text_config"].update(num_experts_per_tok=99), "text_config.num_experts_per_tok",
     r"c\.json \(text_config\): field 'num_experts_per_tok' must be in 1\.\.n_routed_experts=8"),
])
def test_broken_text_config_is_named(change, field, match):
    d = k25_config(text_config(300, 556), INT4)
    change(d)
    with pytest.raises(ConfigError, match=match) as ei:
        ModelConfig.from_dict(d, source="c.json")
    assert ei.value.field == field


def test_unknown_model_type_without_text_config_is_still_refused():
    d = dict(text_config(300, 556), model_type="llama")
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported") as ei:
        ModelConfig.from_dict(d, source="c.json")
    assert ei.value.field == "model_type"


def test_load_names_the_broken_text_config(ckpts, tmp_path):
    d = str(tmp_path / "broken")
    shutil.copytree(ckpts["k25_int4"], d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    del cfg["text_config"]["num_hidden_layers"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=r"config\.json \(text_config\): required field 'num_hidden_layers' is "
                                          r"missing"):
        hybrid_k2.load(d, device="cpu", experts="torch", progress=False)


# ---- tensor names ------------------------------------------------------------------------------------
def test_text_model_names():
    for stored, canonical in [
            ("language_model.model.layers.3.mlp.experts.7.up_proj.weight_packed",
             "model.layers.3.mlp.experts.7.up_proj.weight_packed"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("model.language_model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight"),
            ("model.language_model.norm.weight", "model.norm.weight"),
            ("language_model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm.weight"),
            ("lm_head.weight", "lm_head.weight"), ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight"),
            ("vision_tower.encoder.blocks.0.wqkv.weight", None), ("mm_projector.proj.0.weight", None),
            ("multi_modal_projector.linear_1.weight", None), ("model.vision_tower.patch_embed.proj.weight", None),
            ("model.multi_modal_projector.linear_2.bias", None)]:
        assert text_model_name(stored) == canonical, stored


@pytest.mark.parametrize("name", ["k25_int4", "k25_int4_transformers", "k25_int4_bare"])
def test_prefixed_names_read_as_the_k2_layout(ckpts, name, caplog):
    with caplog.at_level(logging.WARNING, logger="hybrid_k2.checkpoint.hf"):
        with HFCheckpoint(ckpts[name]) as k25, HFCheckpoint(ckpts["k2_int4"]) as k2:
            assert sorted(k25.names()) == sorted(k2.names())
            assert k25.vision_tensors == len(vision_tensors("", "")) and k2.vision_tensors == 0
            for n in k2.names():
                assert k25.format(n) == k2.format(n) and k25.shape(n) == k2.shape(n), n
                assert torch.equal(k25.get(n), k2.get(n)), n
            e = "model.layers.1.mlp.experts.2.down_proj.weight"
            a, b = k25.get_int4(e), k2.get_int4(e)
            assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and a.group_size == b.group_size == 32
            stored = {"k25_int4": "language_model.model.layers.1.mlp.experts.2.down_proj.weight",
                      "k25_int4_transformers": "model.language_model.layers.1.mlp.experts.2.down_proj.weight",
                      "k25_int4_bare": "language_model.layers.1.mlp.experts.2.down_proj.weight"}[name]
            assert k25.stored_name(e) == stored and k2.stored_name(e) == e
            assert k25.stored_name("lm_head.weight") == ("lm_head.weight" if name == "k25_int4_transformers"
                                                         else "language_model.lm_head.weight")
    assert notices(caplog) == [f"{ckpts[name]}: {IMAGES_NOTICE}"]


# ---- logits against HF -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind", [("k25_int4", "int4"), ("k25_int4_transformers", "int4"),
                                       ("k25_int4_bare", "int4"), ("k25_fp8", "fp8"), ("k25_bf16", "bf16")])
def test_logits_match_hf_deepseek_v3(ckpts, name, kind, caplog):
    ids = prompt(ckpts)
    with caplog.at_level(logging.INFO):
        eng = hybrid_k2.load(ckpts[name], device="cpu", dtype=torch.float32, experts="torch", progress=False)
    with eng:
        assert_close_logits(eng.logits(ids), reference_logits(ckpts, kind, ids))
    assert notices(caplog) == [f"{ckpts[name]}: {IMAGES_NOTICE}"]   # one line, once per load
    assert next(r for r in caplog.records if IMAGES_NOTICE in r.getMessage()).levelno == logging.WARNING


def test_int4_experts_run_in_the_cpu_kernels_as_k2_thinking(ckpts, caplog):
    """The default load (C kernels, INT4 experts repacked bit-exactly to Q4_0) of the K2.5 layout computes what
    the Kimi-K2-Thinking layout of the same tensors does, bit for bit; with float dense matrices it stays within
    the experts' Q8_0 activation rounding of HF."""
    ids = prompt(ckpts)
    with caplog.at_level(logging.WARNING):
        with hybrid_k2.load(ckpts["k25_int4"], device="cpu", threads=1, progress=False) as k25, \
                hybrid_k2.load(ckpts["k2_int4"], device="cpu", threads=1, progress=False) as k2:
            assert "Q4_0" in k25.summary and k25.summary.split(":", 1)[1] == k2.summary.split(":", 1)[1]
            got, want = k25.logits(ids), k2.logits(ids)
    assert torch.equal(got, want)
    assert len(notices(caplog)) == 1
    with hybrid_k2.load(ckpts["k25_int4"], device="cpu", threads=1, dense_format="float", progress=False) as k25:
        got = k25.logits(ids)
    ref = reference_logits(ckpts, "int4", ids)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


# ---- bad checkpoints ---------------------------------------------------------------------------------
def rewrite(src: str, dst: str, change) -> str:
    """Copy the checkpoint `src` to `dst` as one shard whose tensors `change` edits in place."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    t = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(src, f)))
    change(t)
    save_safetensors(os.path.join(dst, "model.safetensors"), t)
    return dst


def test_missing_tensor_is_named_as_stored(ckpts, tmp_path):
    d = rewrite(ckpts["k25_int4"], str(tmp_path / "m"),
                lambda t: t.pop("language_model.model.layers.2.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointConfigError) as ei:
        hybrid_k2.load(d, device="cpu", experts="torch", progress=False)
    msg = str(ei.value)
    assert msg.startswith(f"{d}: tensor 'language_model.model.layers.2.self_attn.o_proj.weight' "
                          f"(model.layers.2.self_attn.o_proj.weight) is missing"), msg


def test_bad_int4_scale_is_named_as_stored(ckpts, tmp_path):
    n = "model.language_model.layers.1.mlp.experts.0.up_proj.weight_scale"
    d = rewrite(ckpts["k25_int4_transformers"], str(tmp_path / "s"), lambda t: t.update({n: t[n][:, :1].clone()}))
    with pytest.raises(CheckpointError, match=rf"{d}: '{n}' \(model\.layers\.1\.mlp\.experts\.0\.up_proj\."
                                              rf"weight_scale\) is BF16\[32, 1\]"):
        hybrid_k2.load(d, device="cpu", experts="torch", progress=False)


def test_one_tensor_under_two_prefixes_is_refused(ckpts, tmp_path):
    d = rewrite(ckpts["k25_int4"], str(tmp_path / "d"),
                lambda t: t.update({"model.language_model.norm.weight": t["language_model.model.norm.weight"]}))
    with pytest.raises(CheckpointError, match=r"tensors '(language_model\.model|model\.language_model)\.norm\.weight' "
                                              r"\(model\.safetensors\) and '(model\.language_model|language_model\."
                                              r"model)\.norm\.weight' \(model\.safetensors\) are both the text "
                                              r"model's 'model\.norm\.weight'"):
        HFCheckpoint(d)


# ---- convert -----------------------------------------------------------------------------------------
def test_convert_writes_the_k2_layout_gguf(ckpts, tmp_path, caplog):
    """The K2.5 checkpoint converts to the same GGUF tensors as its Kimi-K2-Thinking layout (INT4 experts become
    Q4_0 without requantizing), and that GGUF's logits match HF within 1e-4 with the other matrices in F32."""
    with caplog.at_level(logging.WARNING):
        a = convert(ckpts["k25_int4"], str(tmp_path / "k25.gguf"), experts="q4_0", other="q8_0", progress=False)
    assert len(notices(caplog)) == 1
    b = convert(ckpts["k2_int4"], str(tmp_path / "k2.gguf"), experts="q4_0", other="q8_0", progress=False)
    ra, rb = GGUFReader(a), GGUFReader(b)
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ra.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data), err_msg=ta.name)
    assert not any(t.name.startswith(("v.", "mm.")) for t in ra.tensors)
    with GGUFCheckpoint(a) as ga, GGUFCheckpoint(b) as gb:
        assert ga.config_dict() == gb.config_dict()
        assert ga.tokenizer_vocab() == gb.tokenizer_vocab()

    f32 = convert(ckpts["k25_int4"], str(tmp_path / "k25-f32.gguf"), experts="q4_0", other="f32", progress=False)
    ids = prompt(ckpts, seed=3)
    with hybrid_k2.load(f32, device="cpu", dtype=torch.float32, experts="torch", progress=False) as eng:
        assert_close_logits(eng.logits(ids), reference_logits(ckpts, "int4", ids))
