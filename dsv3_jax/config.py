"""Frozen dataclass configs, YAML presets, `key=value` overrides and validation with one-line errors.

Every config error is a `ConfigError` whose message names the offending field, so the CLIs can print it as a
single line. Names that registries own (attention and MoE backends, logical axes) are checked by
`presets.load_config`, above the registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import yaml

from dsv3_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN rotary scaling (the fields of HF `rope_scaling` with type "yarn")."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None  # cos/sin multiplier; derived from mscale / mscale_all_dim when None
    truncate: bool = True  # floor/ceil the correction range (HF default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture. Field names follow the HF DeepSeek-V3 `config.json` where one exists."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = None
    max_position_embeddings: int = 2048
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.006
    bos_token_id: int = 0
    eos_token_id: int = 1

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    def validate(self) -> ModelConfig:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and f.name not in _MAY_BE_ZERO and v <= 0:
                raise ConfigError(f"model.{f.name} must be positive, got {v}")
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers", "bos_token_id",
                     "eos_token_id"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"model.q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"model.first_k_dense_replace ({self.first_k_dense_replace}) exceeds "
                              f"num_hidden_layers ({self.num_hidden_layers})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"model.n_routed_experts ({self.n_routed_experts}) is not divisible by "
                              f"model.n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ConfigError(f"model.topk_group ({self.topk_group}) exceeds model.n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(f"model.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                              f"{self.topk_group * per_group} experts in the topk_group={self.topk_group} kept groups")
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(f"model.n_group ({self.n_group}) leaves fewer than 2 experts per group; the group "
                              "score is the sum of each group's top-2")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.bos_token_id >= self.vocab_size or self.eos_token_id >= self.vocab_size:
            raise ConfigError(f"model.bos_token_id/eos_token_id must be < vocab_size ({self.vocab_size})")
        y = self.rope_scaling
        if y is not None:
            if y.factor < 1:
                raise ConfigError(f"model.rope_scaling.factor must be >= 1, got {y.factor}")
            if y.original_max_position_embeddings <= 0:
                raise ConfigError("model.rope_scaling.original_max_position_embeddings must be positive")
        return self


_MAY_BE_ZERO = {"first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers", "bos_token_id",
                "eos_token_id", "routed_scaling_factor"}


@dataclasses.dataclass(frozen=True)
class ImplConfig:
    """How the architecture is computed; none of it changes the function the model computes (up to rounding), so a
    run may resume with a different `impl` (a run dir pins only `model`)."""

    dtype: str = "float32"  # activations between layers
    param_dtype: str = "float32"  # master weights
    precision: str = "fp32"  # fp32 | bf16 | fp8 : operands of the linear-layer matmuls (kernels.precision.policy)
    remat: str = "none"  # none | full | dots : rematerialisation policy of each scanned block
    scan_layers: bool = True  # False: unroll the layer stack (no per-layer slice/stack copies; compile grows)
    moe_impl: str = "auto"  # auto or a name in model.moe_backends.BACKENDS
    moe_block_size: int = 32  # rows per expert-aligned block of the portable grouped matmul
    moe_blocks_per_step: int | None = None  # blocked grouped matmul: a loop over the used blocks, this many a
    # step; 0 = one batched matmul over every block, padding included; None = 8 on CPU, 0 elsewhere
    moe_ep_chunk_tokens: int = 0  # expert-parallel: most tokens per exchange (moe_backends.in_token_chunks); 0: all
    moe_capacity_factor: float | None = None  # expert-parallel: rows one device may send another per exchange, as
    # a multiple of the balanced share (routed rows / shards); rows past it are dropped (zero output) and counted
    # (metric moe_dropped_fraction). None: dropless, with receive buffers for the worst case (shards x rows)
    grad_reduce: str = "step"  # step: micro-batch gradients summed per device, reduced once per step (weights
    # gathered once per step, routed experts stay on their shards); micro_batch: reduced (and weights gathered) in
    # every micro-batch by GSPMD, less memory (train/step.py data_parallel_region)
    gather_weights: str = "step"  # under grad_reduce step, the weights other than the routed experts: step =
    # gathered whole once per step and kept for every micro-batch (least traffic, a whole copy per device); layer =
    # kept on their shards over the batch axes (mesh.rules; e.g. the intra-node axis) and gathered layer by layer
    # as each runs, their gradients reduce-scattered back per micro-batch (parallel/data_parallel.py)
    attention: str = "auto"  # auto or a name in kernels.attention.BACKENDS
    attention_block_size: int = 512  # queries and keys per block of the blocked backend; decode's cache blocks
    vocab_chunk: int = 0  # training: the head's cross-entropy over this many vocabulary columns at a time, never the
    # whole (tokens, V) logits (kernels/chunked_ce.py); 0 = whole logits. Eval and sampling keep whole logits

    def validate(self) -> ImplConfig:
        for name, allowed in (("dtype", _DTYPES), ("param_dtype", _DTYPES), ("precision", PRECISIONS),
                              ("remat", _REMAT)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"impl.{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if self.grad_reduce not in ("step", "micro_batch"):
            raise ConfigError(f"impl.grad_reduce must be step or micro_batch, got {self.grad_reduce!r}")
        if self.gather_weights not in ("step", "layer"):
            raise ConfigError(f"impl.gather_weights must be step or layer, got {self.gather_weights!r}")
        if self.moe_block_size <= 0:
            raise ConfigError(f"impl.moe_block_size must be positive, got {self.moe_block_size}")
        if self.moe_blocks_per_step is not None and self.moe_blocks_per_step < 0:
            raise ConfigError(f"impl.moe_blocks_per_step must be >= 0, got {self.moe_blocks_per_step}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            raise ConfigError(f"impl.moe_capacity_factor must be positive or null, got {self.moe_capacity_factor}")
        if self.moe_ep_chunk_tokens < 0:
            raise ConfigError(f"impl.moe_ep_chunk_tokens must be >= 0, got {self.moe_ep_chunk_tokens}")
        if self.vocab_chunk < 0:
            raise ConfigError(f"impl.vocab_chunk must be >= 0, got {self.vocab_chunk}")
        if self.attention_block_size <= 0:
            raise ConfigError(f"impl.attention_block_size must be positive, got {self.attention_block_size}")
        return self


IMPL_FIELDS = frozenset(f.name for f in dataclasses.fields(ImplConfig))


PRECISIONS = ("fp32", "bf16", "fp8")


_REMAT = {"none", "full", "dots"}




_DTYPES = {"float32", "bfloat16", "float16"}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 on one axis takes all remaining devices) and overrides of the logical -> mesh rules table
    (parallel.sharding.RULES): `rules: {heads: tensor, embed: [fsdp, expert], q_lora: null}`, kept as sorted pairs so
    the config stays hashable."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    context: int = 1  # splits the sequence (parallel/context_parallel.py); the mesh has this axis only when > 1
    tensor: int = 1
    rules: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "rules", _rule_pairs(self.rules))


def _rule_pairs(rules) -> tuple:
    """A `mesh.rules` mapping (or pairs) -> sorted ((logical, mesh axis | tuple of mesh axes | None), ...)."""
    try:
        items = dict(rules or {}).items()
    except (TypeError, ValueError):
        raise ConfigError(f"mesh.rules must map logical axes to a mesh axis, a list of mesh axes or null, got "
                          f"{rules!r}") from None
    out = []
    for name, value in items:
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        if not (value is None or isinstance(value, str) or all(isinstance(v, str) for v in value)):
            raise ConfigError(f"mesh.rules.{name} must be a mesh axis, a list of mesh axes or null, got {value!r}")
        out.append((str(name), value))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is tokenised and packed."""

    source: str = "stdlib"  # "stdlib" (Python's own sources) or a glob of local files
    format: str = "auto"  # auto | text | jsonl | parquet | arrayrecord
    text_field: str = "text"
    tokenizer: str = "byte"  # "byte" or a path to an HF tokenizer.json
    seq_len: int = 256
    eval_fraction: float = 0.02
    shuffle_seed: int = 0
    max_documents: int | None = None
    cache_dir: str = "~/.cache/dsv3_jax/data"  # where a raw source is prepared on the fly (one subdir per variant)
    prepare_processes: int = 1  # worker processes for that on-the-fly prepare
    workers: int = 0  # grain worker processes that assemble rows (0: in the training process)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe, schedules, logging and checkpointing."""

    steps: int = 600
    global_batch_size: int = 16
    micro_batches: int = 1
    learning_rate: float = 2.2e-4
    min_learning_rate: float = 2.2e-5
    warmup_steps: int = 50
    constant_steps: int = 0  # after warmup; then cosine to min_learning_rate until `steps`
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_step: int | None = None  # step where lambda drops to mtp_lambda_late (None: never)
    balance_alpha: float = 1e-4  # the report's sequence-wise balance loss; applies under every `balance` strategy
    balance: str = "aux_free"  # aux_free (bias rule) | aux_loss (batch-level aux loss, bias frozen) | none
    aux_loss_alpha: float = 1e-2  # weight of the batch-level aux loss under balance=aux_loss
    bias_gamma: float = 1e-3
    bias_gamma_stop_step: int | None = None  # step from which gamma is 0 (None: never)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    peak_tflops: float | None = None  # device peak for MFU; None: measured (CPU) or looked up per device kind
    sample_tokens: int = 200
    sample_prompt: str = "def "
    tensorboard: bool = True
    progress: bool = True  # the \r progress line on process 0 (only when stderr is a terminal)
    async_checkpoint: bool = True
    moments_dtype: str = "float32"  # float32 | bfloat16 : the AdamW moments (master weights stay float32)
    init_from: str | None = None  # a run or step dir whose params and router bias start this run (a new stage:
    # longer context, new rope scaling); shapes must match; fresh optimizer at step 0; ignored once run_dir resumes

    def validate(self) -> TrainConfig:
        for name in ("steps", "global_batch_size", "micro_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip", "mtp_lambda",
                     "mtp_lambda_late", "balance_alpha", "aux_loss_alpha", "bias_gamma", "warmup_steps",
                     "constant_steps", "eval_every", "eval_batches", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batches:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                              f"train.micro_batches ({self.micro_batches})")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ConfigError(f"train.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train.peak_tflops must be positive or null, got {self.peak_tflops}")
        if not self.run_dir:
            raise ConfigError("train.run_dir must not be empty")
        if self.balance not in BALANCE_STRATEGIES:
            raise ConfigError(f"train.balance must be one of {list(BALANCE_STRATEGIES)}, got {self.balance!r}")
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.moments_dtype must be float32 or bfloat16, got {self.moments_dtype!r}")
        return self


BALANCE_STRATEGIES = ("aux_free", "aux_loss", "none")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Generation settings."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    impl: ImplConfig = dataclasses.field(default_factory=ImplConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.impl.validate()
        self.train.validate()
        if self.impl.precision == "fp8":
            for name, k in fp8_contraction_dims(self.model).items():
                if k < FP8_MIN_K:
                    raise ConfigError(f"impl.precision=fp8 needs linear-layer contractions of at least {FP8_MIN_K}: "
                                      f"model.{name} is {k}")
        return self


FP8_MIN_K = 32  # one k-step of the Hopper FP8 MMA; a shorter contraction would be mostly padding


def fp8_contraction_dims(m: ModelConfig) -> dict[str, int]:
    """The contraction length of every linear-layer GEMM that FP8 training runs, by the config field(s) it comes
    from (the absorbed decode projections contract over qk_nope_head_dim and kv_lora_rank)."""
    dims = {"hidden_size": m.hidden_size, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
            "num_attention_heads*v_head_dim": m.num_attention_heads * m.v_head_dim}
    if m.q_lora_rank is not None:
        dims["q_lora_rank"] = m.q_lora_rank
    if m.first_k_dense_replace:
        dims["intermediate_size"] = m.intermediate_size
    if m.num_moe_layers or m.num_nextn_predict_layers:
        dims["moe_intermediate_size"] = m.moe_intermediate_size
    return dims


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    if where == "model." and key in IMPL_FIELDS:
        return ConfigError(f"model.{key} is an implementation choice, not architecture: set impl.{key}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {where}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type of a dataclass field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where + ".")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} expects {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, d: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a dict; unknown keys raise with the closest valid name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise _unknown(key, names, where)
        kwargs[key] = _coerce(value, hints[key], where + key)
    return cls(**kwargs)


def upgrade(d: dict) -> dict:
    """A saved config dict from before the `impl` section (its fields lived in `model`) in today's layout."""
    model = dict(d.get("model") or {})
    moved = {k: model.pop(k) for k in list(model) if k in IMPL_FIELDS}
    if not moved:
        return d
    return {**d, "model": model, "impl": {**moved, **(d.get("impl") or {})}}


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` (or `field=value`, searched in all sections) overrides."""
    d = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        path = key.split(".")
        if len(path) == 1:
            owners = [s for s in d if isinstance(d[s], dict) and path[0] in d[s]]
            if not owners:
                valid = [f"{s}.{k}" for s in d for k in d[s]]
                raise _unknown(key, valid + [k for s in d for k in d[s]], "")
            path = [owners[0]] + path
        node = d
        for i, p in enumerate(path[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise _unknown(p, list(node) if isinstance(node, dict) else [], ".".join(path[:i]) + "." * bool(i))
            if node[p] is None:
                node[p] = {}
            node = node[p]
        if path[-1] not in node:
            raise _unknown(path[-1], list(node), ".".join(path[:-1]) + ".")
        node[path[-1]] = value
    return from_dict(Config, d).validate()
