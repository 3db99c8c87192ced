import json

import pytest

from hybrid_k2.config import ConfigError, ModelConfig, preset

KIMI_JSON = {  # as in moonshotai/Kimi-K2-Instruct config.json (relevant fields)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "rms_norm_eps": 1e-06, "rope_theta": 50000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": False, "hidden_act": "silu",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_kimi_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_JSON))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg == preset("kimi-k2").replace(source=cfg.source)
    assert cfg.moe_layers == list(range(1, 61))
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 32.0
    # softmax scale 192^-0.5 * mscale^2 with mscale = 0.1 * ln(32) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 3.4657359 + 1) ** 2, rel=1e-6)
    assert cfg.expert_params == 44_040_192


def test_rope_parameters_form_equals_rope_scaling_form():
    d = dict(KIMI_JSON)
    rs = d.pop("rope_scaling")
    theta = d.pop("rope_theta")
    d["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": theta}
    assert ModelConfig.from_dict(d).rope_scaling == ModelConfig.from_dict(KIMI_JSON).rope_scaling


@pytest.mark.parametrize("field,value,msg", [
    ("hidden_size", "7168", "'hidden_size' must be an integer"),
    ("num_experts_per_tok", 500, "'num_experts_per_tok'"),
    ("n_group", 5, "'n_group' must divide"),
    ("topk_group", 2, "'topk_group' must be <="),
    ("scoring_func", "relu", "'scoring_func'"),
    ("model_type", "llama", "model_type 'llama' is not supported"),
    ("qk_rope_head_dim", 63, "'qk_rope_head_dim' must be even"),
    ("rope_scaling", {"type": "longrope", "factor": 2}, "'rope_scaling.type'"),
    ("hidden_act", "gelu", "'hidden_act'"),
])
def test_bad_field_is_named(tmp_path, field, value, msg):
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_JSON, field: value}))
    with pytest.raises(ConfigError, match=msg) as e:
        ModelConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_missing_field_and_bad_json(tmp_path):
    d = dict(KIMI_JSON)
    del d["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="required field 'kv_lora_rank' is missing"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_json(tmp_path / "nowhere")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'kimi-k3'"):
        preset("kimi-k3")
