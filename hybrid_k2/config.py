"""ModelConfig: the DeepSeek-V3 / Kimi K2 hyper-parameters, read from an HF config.json or a preset."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config field is missing or invalid; the message names the field and the source (`field` holds the
    field's name when there is one, so a reader can name its own key for it, e.g. a GGUF metadata key)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# Upper bounds on the sizes a config may ask for: generous (many times any published model's: Kimi K2 has
# 61 layers, hidden 7168, vocab 163840, 384 experts, 64 heads of 192, 131072 positions) but finite, so a
# corrupt or hostile config.json / GGUF header is refused by field name at parse time instead of making
# the loader loop over millions of layers or ask the allocator for terabytes. The tensors themselves are
# then checked against the checkpoint (checkpoint.check_config_against) before anything is allocated.
MAX_LAYERS = 4096            # layers, dense-prefix length, MoE period, MTP layers
MAX_WIDTH = 1 << 17          # hidden size and the LoRA ranks (widest published: ~25k)
MAX_FFN = 1 << 20            # FFN widths, also moe_intermediate_size * n_shared_experts
MAX_VOCAB = 1 << 24          # largest published vocabularies are ~256k
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_EXPERTS = 1 << 16        # routed experts (and the group count, which divides them)
MAX_SHARED_EXPERTS = 1 << 10
MAX_POSITIONS = 1 << 24      # the longest announced context windows are ~10M


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
    # multi-token-prediction layers stored after the trunk: not run here, so not part of the model's identity
    num_nextn_predict_layers: int = field(default=0, compare=False)
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
        except (ValueError, RecursionError) as e:   # JSONDecodeError, bad UTF-8, ints past 4300 digits, deep nesting
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config.json ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type", "deepseek_v3")
        if mt not in TEXT_MODEL_TYPES and (mt in MULTIMODAL_MODEL_TYPES or "text_config" in d):
            return cls._from_text_config(d, source)
        if mt not in TEXT_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {mt!r} is not supported (expected 'kimi_k2' or 'deepseek_v3', "
                              f"or a wrapper such as 'kimi_k25' holding one as text_config)", "model_type")

        def get(name, typ, default=_REQUIRED):
            if name not in d or d[name] is None:
                if default is _REQUIRED:
                    raise ConfigError(f"{source}: required field {name!r} is missing", name)
                return default
            v = d[name]
            if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{source}: field {name!r} must be an integer, got {v!r}", name)
            if typ is float:
                return _number(v, name, source)
            if typ is bool and not isinstance(v, bool):
                raise ConfigError(f"{source}: field {name!r} must be true/false, got {v!r}", name)
            if typ is str and not isinstance(v, str):
                raise ConfigError(f"{source}: field {name!r} must be a string, got {v!r}", name)
            return typ(v)

        eos = d.get("eos_token_id")
        if isinstance(eos, list):   # HF allows several; the first is the one generation stops on by default
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
                raise ConfigError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, "
                                  f"got {eos!r}", "eos_token_id")
            eos = eos[0] if eos else None
        elif eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
            raise ConfigError(f"{source}: field 'eos_token_id' must be an integer, got {eos!r}", "eos_token_id")
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
            eos_token_id=eos,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            model_type=mt,
            num_nextn_predict_layers=get("num_nextn_predict_layers", int, 0),
            source=source,
        )
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu', got {d['hidden_act']!r}", "hidden_act")
        cfg.validate()
        return cfg

    @classmethod
    def _from_text_config(cls, d: dict, source: str) -> "ModelConfig":
        """A multimodal wrapper (Kimi K2.5+: model_type kimi_k25) keeps its language model's config under
        `text_config`; the vision tower's config beside it is not ours to read."""
        text = d.get("text_config")
        if text is None:
            raise ConfigError(f"{source}: model_type {d.get('model_type')!r} keeps the language model's config under "
                              f"'text_config', which is missing", "text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: field 'text_config' must be an object, got {type(text).__name__}",
                              "text_config")
        tmt = text.get("model_type", "deepseek_v3")
        if tmt not in TEXT_MODEL_TYPES:
            raise ConfigError(f"{source}: field 'text_config.model_type' {tmt!r} is not supported (expected "
                              f"'kimi_k2' or 'deepseek_v3')", "text_config.model_type")
        # token ids and the embedding tie may sit on the wrapper only
        text = {**{k: d[k] for k in INHERITED_FIELDS if k in d and k not in text}, **text}
        try:
            return cls.from_dict(text, source=f"{source} (text_config)")
        except ConfigError as e:
            raise ConfigError(str(e), f"text_config.{e.field}" if e.field else "text_config") from None

    def validate(self) -> None:
        """Every field, by name: types, ranges (finite, bounded by the MAX_* limits) and the relations between
        fields that the model and the loaders rely on. Runs at parse time (from_dict, replace), not per token."""
        src = self.source

        def bad(name, why, value=None):
            got = getattr(self, name) if value is None and "." not in name else value
            raise ConfigError(f"{src}: field {name!r} {why} (got {got!r})", name)

        def integer(name, lo, hi, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
            if not lo <= v <= hi:
                bad(name, f"must be in {lo}..{hi}")

        def number(name, value, lo, lo_open=True, optional=False, hi=None):
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a finite number", value)
            if value < lo or (lo_open and value == lo):
                bad(name, f"must be {'>' if lo_open else '>='} {lo}", value)
            if hi is not None and value > hi:
                bad(name, f"must be <= {hi}", value)

        for name, lo, hi in (("vocab_size", 1, MAX_VOCAB), ("hidden_size", 1, MAX_WIDTH),
                             ("intermediate_size", 0, MAX_FFN), ("moe_intermediate_size", 0, MAX_FFN),
                             ("num_hidden_layers", 1, MAX_LAYERS), ("num_attention_heads", 1, MAX_HEADS),
                             ("kv_lora_rank", 1, MAX_WIDTH), ("qk_nope_head_dim", 1, MAX_HEAD_DIM),
                             ("qk_rope_head_dim", 1, MAX_HEAD_DIM), ("v_head_dim", 1, MAX_HEAD_DIM),
                             ("n_routed_experts", 0, MAX_EXPERTS), ("n_shared_experts", 0, MAX_SHARED_EXPERTS),
                             ("num_experts_per_tok", 0, MAX_EXPERTS), ("n_group", 1, MAX_EXPERTS),
                             ("topk_group", 1, MAX_EXPERTS), ("first_k_dense_replace", 0, MAX_LAYERS),
                             ("moe_layer_freq", 1, MAX_LAYERS), ("max_position_embeddings", 1, MAX_POSITIONS),
                             ("num_nextn_predict_layers", 0, MAX_LAYERS)):
            integer(name, lo, hi)
        integer("q_lora_rank", 1, MAX_WIDTH, optional=True)
        integer("bos_token_id", 0, self.vocab_size - 1, optional=True)
        integer("eos_token_id", 0, self.vocab_size - 1, optional=True)
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true/false")
        if self.n_shared_experts * self.moe_intermediate_size > MAX_FFN:
            bad("n_shared_experts", f"times moe_intermediate_size={self.moe_intermediate_size} must be <= {MAX_FFN}")
        has_dense = (self.first_k_dense_replace > 0 or self.n_routed_experts == 0 or self.moe_layer_freq > 1)
        if has_dense and self.intermediate_size <= 0:
            bad("intermediate_size", "must be positive when there are dense layers")
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
        if self.model_type not in TEXT_MODEL_TYPES:
            bad("model_type", "must be 'kimi_k2' or 'deepseek_v3'")
        number("routed_scaling_factor", self.routed_scaling_factor, 0, hi=1e4)   # K2: 2.827
        number("rms_norm_eps", self.rms_norm_eps, 0, hi=1)   # models use 1e-6..1e-5
        number("rope_theta", self.rope_theta, 1)   # the YaRN ramp divides by log(rope_theta)
        rs = self.rope_scaling
        if not isinstance(rs, RopeScaling) or rs.type not in ("default", "yarn"):
            bad("rope_scaling", "must be default or yarn scaling")
        if rs.type == "yarn":
            number("rope_scaling.factor", rs.factor, 1, lo_open=False)
            o = rs.original_max_position_embeddings
            if isinstance(o, bool) or not isinstance(o, int) or not 1 <= o <= MAX_POSITIONS:
                bad("rope_scaling.original_max_position_embeddings", f"must be an integer in 1..{MAX_POSITIONS}", o)
            # the YaRN ramp takes log(original / (beta * 2 pi)): finite for betas in this (wide) range
            number("rope_scaling.beta_fast", rs.beta_fast, 1e-30, lo_open=False, hi=1e30)
            number("rope_scaling.beta_slow", rs.beta_slow, 1e-30, lo_open=False, hi=1e30)
            # 0..1000 keeps yarn_mscale >= 1 and the softmax scale (mscale squared) finite; models use ~0.7..1
            number("rope_scaling.mscale", rs.mscale, 0, lo_open=False, hi=1e3)
            number("rope_scaling.mscale_all_dim", rs.mscale_all_dim, 0, lo_open=False, hi=1e3)
            number("rope_scaling.attention_factor", rs.attention_factor, 0, optional=True, hi=1e3)   # cos/sin factor
            if not isinstance(rs.truncate, bool):
                bad("rope_scaling.truncate", "must be true/false", rs.truncate)
            if not 0 < self.softmax_scale < math.inf:
                bad("rope_scaling.mscale_all_dim", f"gives a softmax scale of {self.softmax_scale}")


_REQUIRED = object()
TEXT_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
# wrappers whose language model is a DeepSeek-V3 under `text_config` (any model_type holding a text_config is
# read the same way; these are refused by name when it is missing)
MULTIMODAL_MODEL_TYPES = ("kimi_k25", "kimi_vl")
INHERITED_FIELDS = ("bos_token_id", "eos_token_id", "tie_word_embeddings")


def quantization_config(d: dict):
    """The quantization_config that applies to the language model: text_config's own, else the top-level one
    (Kimi K2.5 writes it beside text_config). None when there is none; not checked here."""
    text = d.get("text_config") if isinstance(d, dict) else None
    if isinstance(text, dict) and text.get("quantization_config") is not None:
        return text["quantization_config"]
    return d.get("quantization_config") if isinstance(d, dict) else None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(d: dict, source: str) -> tuple[float, RopeScaling]:
    """Kimi writes `rope_theta` + `rope_scaling{type:yarn,...}`; transformers>=5 writes `rope_parameters`.
    Types are checked here; ranges in ModelConfig.validate."""
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or {}
    if not isinstance(rp, dict) or not isinstance(rs, dict):
        raise ConfigError(f"{source}: field 'rope_scaling'/'rope_parameters' must be an object", "rope_scaling")
    merged = {**rs, **rp}
    theta = _number(merged.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta", source)
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{source}: field 'rope_scaling.type' {kind!r} is not supported (expected 'yarn' or none)",
                          "rope_scaling.type")
    if kind == "default":
        return theta, RopeScaling()
    for k in ("factor", "original_max_position_embeddings"):
        if merged.get(k) is None:
            raise ConfigError(f"{source}: field 'rope_scaling.{k}' is required for yarn", f"rope_scaling.{k}")
    num = {k: _number(merged[k], f"rope_scaling.{k}", source)
           for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
           if merged.get(k) is not None}
    orig = merged["original_max_position_embeddings"]
    if isinstance(orig, bool) or not isinstance(orig, int):
        raise ConfigError(f"{source}: field 'rope_scaling.original_max_position_embeddings' must be an integer, "
                          f"got {orig!r}", "rope_scaling.original_max_position_embeddings")
    truncate = merged.get("truncate")
    truncate = True if truncate is None else truncate
    if not isinstance(truncate, bool):
        raise ConfigError(f"{source}: field 'rope_scaling.truncate' must be true/false, got {truncate!r}",
                          "rope_scaling.truncate")
    return theta, RopeScaling(
        type="yarn",
        factor=num["factor"],
        original_max_position_embeddings=orig,
        beta_fast=num.get("beta_fast", 32.0),
        beta_slow=num.get("beta_slow", 1.0),
        mscale=num.get("mscale", 1.0),
        mscale_all_dim=num.get("mscale_all_dim", 0.0),
        attention_factor=num.get("attention_factor"),
        truncate=truncate,
    )


def _number(v, name: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{source}: field {name!r} must be a number, got {v!r}", name)
    try:
        return float(v)
    except OverflowError:   # an integer beyond float range
        raise ConfigError(f"{source}: field {name!r} must be a finite number, got an integer of "
                          f"{v.bit_length()} bits", name) from None


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
