"""ModelConfig: the DeepSeek-V3 / Kimi K2 hyper-parameters, read from an HF config.json or a preset."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config field is missing or invalid; the message names the field and the source."""


@dataclass(frozen=True)
class RopeScaling:
    type: str = "default"                 # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # cos/sin multiplier; derived from mscale when None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "deepseek_v3"
    source: str = "<preset>"

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (DeepSeek-V3 reference and HF agree)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs.type == "yarn" and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def replace(self, **kw) -> "ModelConfig":
        cfg = dataclasses.replace(self, **kw)
        cfg.validate()
        return cfg

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(f"{source}: model_type {mt!r} is not supported (expected 'kimi_k2' or 'deepseek_v3')")

        def get(name, typ, default=_REQUIRED):
            if name not in d or d[name] is None:
                if default is _REQUIRED:
                    raise ConfigError(f"{source}: required field {name!r} is missing")
                return default
            v = d[name]
            if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{source}: field {name!r} must be an integer, got {v!r}")
            if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{source}: field {name!r} must be a number, got {v!r}")
            if typ is bool and not isinstance(v, bool):
                raise ConfigError(f"{source}: field {name!r} must be true/false, got {v!r}")
            if typ is str and not isinstance(v, str):
                raise ConfigError(f"{source}: field {name!r} must be a string, got {v!r}")
            return typ(v)

        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        rope_theta, rope = _parse_rope(d, source)
        cfg = cls(
            vocab_size=get("vocab_size", int),
            hidden_size=get("hidden_size", int),
            intermediate_size=get("intermediate_size", int),
            moe_intermediate_size=get("moe_intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=get("num_attention_heads", int),
            q_lora_rank=get("q_lora_rank", int, None),
            kv_lora_rank=get("kv_lora_rank", int),
            qk_nope_head_dim=get("qk_nope_head_dim", int),
            qk_rope_head_dim=get("qk_rope_head_dim", int),
            v_head_dim=get("v_head_dim", int),
            n_routed_experts=get("n_routed_experts", int, 0),
            n_shared_experts=get("n_shared_experts", int, 0),
            num_experts_per_tok=get("num_experts_per_tok", int, 0),
            n_group=get("n_group", int, 1),
            topk_group=get("topk_group", int, 1),
            topk_method=get("topk_method", str, "noaux_tc"),
            scoring_func=get("scoring_func", str, "sigmoid"),
            norm_topk_prob=get("norm_topk_prob", bool, True),
            routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
            first_k_dense_replace=get("first_k_dense_replace", int, 0),
            moe_layer_freq=get("moe_layer_freq", int, 1),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope,
            max_position_embeddings=get("max_position_embeddings", int, 4096),
            bos_token_id=get("bos_token_id", int, None),
            eos_token_id=eos if isinstance(eos, int) else None,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            model_type=mt,
            source=source,
        )
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu', got {d['hidden_act']!r}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        src = self.source

        def bad(name, why):
            raise ConfigError(f"{src}: field {name!r} {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "n_group", "topk_group", "moe_layer_freq"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad("q_lora_rank", "must be positive or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            bad("intermediate_size", "must be positive when there are dense layers")
        if self.n_routed_experts < 0:
            bad("n_routed_experts", "must be >= 0")
        if self.n_routed_experts:
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be positive")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                bad("topk_group", f"must be <= n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                bad("topk_group", f"selects too few experts for num_experts_per_tok={self.num_experts_per_tok}")
            if self.n_group > 1 and per_group < 2:
                bad("n_group", "leaves fewer than 2 experts per group")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            bad("topk_method", "must be 'noaux_tc', 'greedy' or 'group_limited_greedy'")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "must be positive")
        if not self.rope_theta > 0:
            bad("rope_theta", "must be positive")
        if self.rope_scaling.type == "yarn" and not self.rope_scaling.factor >= 1:
            raise ConfigError(f"{src}: field 'rope_scaling.factor' must be >= 1 for yarn "
                              f"(got {self.rope_scaling.factor!r})")


_REQUIRED = object()


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(d: dict, source: str) -> tuple[float, RopeScaling]:
    """Kimi writes `rope_theta` + `rope_scaling{type:yarn,...}`; transformers>=5 writes `rope_parameters`."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    if not isinstance(rp, dict) or not isinstance(rs, dict):
        raise ConfigError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object")
    merged = {**rs, **rp}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"{source}: field 'rope_theta' must be a number, got {theta!r}")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{source}: field 'rope_scaling.type' {kind!r} is not supported (expected 'yarn' or none)")
    if kind == "default":
        return float(theta), RopeScaling()
    for k in ("factor", "original_max_position_embeddings"):
        if k not in merged:
            raise ConfigError(f"{source}: field 'rope_scaling.{k}' is required for yarn")
    num = {}
    for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor"):
        v = merged.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{source}: field 'rope_scaling.{k}' must be a number, got {v!r}")
        num[k] = v
    return float(theta), RopeScaling(
        type="yarn",
        factor=float(num["factor"]),
        original_max_position_embeddings=int(num["original_max_position_embeddings"]),
        beta_fast=float(num.get("beta_fast") or 32.0),
        beta_slow=float(num.get("beta_slow") or 1.0),
        mscale=float(num.get("mscale", 1.0)),
        mscale_all_dim=float(num.get("mscale_all_dim", 0.0)),
        attention_factor=num.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
    )


# ---- presets -------------------------------------------------------------------------------------
KIMI_K2 = dict(
    model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384,
    n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, topk_method="noaux_tc",
    scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.827, first_k_dense_replace=1,
    moe_layer_freq=1, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=131072,
    rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=163584, eos_token_id=163585, tie_word_embeddings=False,
)

PRESETS = {"kimi-k2": KIMI_K2}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict(PRESETS[name], source=f"<preset {name}>")
