"""Generation on the latent MLA cache: one batched prefill, a compiled decode loop, sampling rules, and MTP
speculative decoding.

Legend: B prompts (rows), T padded prompt length, S cache slots, V vocabulary, U new-token budget per row.

Prefill runs all prompts in ONE forward pass, right-padded: row b's tokens sit at positions 0..len_b-1 and are
written to the cache there (padding writes garbage at positions >= len_b, which the row's own decode tokens
overwrite before any query can see them, since a query at position p attends to slots <= p and slot p is written in
the same step). Every row then decodes at its own position. The decode loop is a `lax.while_loop` inside `jit`, so
there is no Python dispatch per token; parameters, router bias and cache are explicit inputs/outputs
(`nnx.split` outside, `nnx.merge` inside the compiled function).

Streaming: the compiled loop runs in chunks of `chunk_size` tokens and `on_tokens` is called on the host between
chunks (one device sync per chunk, not per token). Without `on_tokens` the whole budget runs in one compiled call.

Under a mesh (`generate(..., mesh=)`) both programs are compiled with the mesh and `DECODE_RULES` current: the
rows and their latent caches split over the batch axes (attention runs data-parallel on each device's rows, its
weights replicated, or split over heads by `tensor`), the routed experts over `expert` (the MoE layer's
expert-parallel dispatch exchanges the rows' tokens), and the batch padded to a multiple of the batch axes with
copies of the first prompt (same routing, so no extra expert reads; their tokens are dropped). FP8 weights kept by
`hf.load(keep_fp8=True)` enter both programs as E4M3 (`kernels.fp8_weights`).

Speculative decoding (`speculative="mtp"`): the depth-1 MTP module drafts token p+1 from the main model's pre-norm
hidden state at p-1 and the embedding of the accepted token at p; the main model verifies [accepted, draft] at
positions [p, p+1] in one 2-token forward on the cache, and the draft is accepted iff it equals the token the main
model itself picks at p (argmax when greedy; its sample otherwise, which keeps the sampling distribution exact).
Greedy speculative output is therefore the plain greedy output. The MTP block keeps its own latent cache, indexed
by the same positions (entry t is built from the main hidden at t and the token at t+1); both entries of a step
are written, but the MTP block's FFN and the head run on the one token per row whose draft is used (`mtp_draft`).
Batched rows each accept or reject on their own.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import GenerateError
from dsv3_jax.kernels.shapes import round_up
from dsv3_jax.model.routing import RouterBias
from dsv3_jax.model.transformer import block_consts, unstacked
from dsv3_jax.parallel.sharding import RULES, constrain, logical_size, use_rules

# The logical-axis table for decoding: as training's, but no weight split over the data-parallel axes (`embed`,
# `q_lora`, `kv_lora` replicated): a decode step reads every weight once per token, and gathering FSDP shards
# would move the whole non-expert model over the interconnect on every step. Experts stay split over `expert`,
# heads / FFN widths / vocabulary over `tensor`, rows (and their caches) over the batch axes.
DECODE_RULES = {**RULES, "embed": None, "q_lora": None, "kv_lora": None}


@dataclasses.dataclass(frozen=True)
class SamplingRule:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> SamplingRule:
        if not self.temperature >= 0:
            raise GenerateError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclasses.dataclass
class GenerateResult:
    """New tokens per prompt (a stop token that ended a row is included), why each row ended ("stop" or
    "length"), timing (seconds, tokens/s, forward passes) and, for speculative decoding, the acceptance of THIS
    call: accepted drafts / drafts (None when nothing was drafted)."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    timing: dict
    acceptance: float | None = None
    drafts: int = 0
    accepted: int = 0


def cache_bytes_per_token(cfg: ModelConfig, dtype="float32", mtp: bool = False) -> int:
    """Latent cache size of one token: (kv_lora_rank + qk_rope_head_dim) per layer. The main model's layers
    always count; the MTP layers only with `mtp=True` (speculative decoding keeps their cache too)."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers * jnp.dtype(dtype).itemsize


def sample_tokens(logits_bv: jax.Array, key: jax.Array, rule: SamplingRule) -> jax.Array:
    """Next token per row (B,) int32: argmax when greedy, else a categorical draw from the tempered logits
    restricted to the top-k tokens and to the smallest set whose probability reaches top_p."""
    logits = logits_bv.astype(jnp.float32)
    if rule.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / rule.temperature
    if 0 < rule.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, rule.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if rule.top_p < 1:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < rule.top_p  # mass before this token; the first is kept
        threshold = jnp.take_along_axis(desc, keep.sum(-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _not_constant(tree):
    """`tree` behind an optimization barrier. The prompt positions and the empty cache are otherwise compile-time
    constants, and XLA constant-folds the masked attention over the empty cache element by element: with thousands
    of prompts the prefill then takes minutes to compile instead of seconds."""
    return jax.lax.optimization_barrier(tree)


def prefill(model, ids_bt: jax.Array, lens_b: jax.Array, slots: int):
    """All prompts in one forward pass on a fresh cache of `slots` slots. Returns (logits (B, T, V),
    pre-norm hidden (B, T, D), main cache {"dense", "moe"}, MTP caches (list, empty without MTP))."""
    b, t = ids_bt.shape
    pos_bt, cache = _not_constant((jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                                   model.init_cache(b, slots)))
    cache = split_rows(cache)
    mtp_cache = cache.pop("mtp", [])
    seg_bt = (pos_bt < lens_b[:, None]).astype(jnp.int32)  # 0 marks padding (kept out of the expert counts)
    logits, hidden, cache = main_forward(model, ids_bt, pos_bt, seg_bt, cache)
    return logits, hidden, cache, mtp_cache


def split_rows(cache):
    """Every cache array ([L,] B, S, .) split over the batch axes (a no-op without a mesh): each device holds its
    rows."""
    return jax.tree.map(lambda a: constrain(a, (None,) * (a.ndim - 3) + ("batch", None, None)), cache)


def decode_step(model, ids_bt: jax.Array, pos_bt: jax.Array, cache: dict):
    """T new tokens per row at their own positions on the cache. Returns (logits (B, T, V), hidden, cache)."""
    return main_forward(model, ids_bt, pos_bt, jnp.ones(ids_bt.shape, jnp.int32), cache)


def has_fp8(model) -> bool:
    """Whether the model holds FP8 weights kept as E4M3 (`hf.load(keep_fp8=True)`)."""
    return any(x.dtype == jnp.float8_e4m3fn for x in jax.tree.leaves(nnx.state(model)))


def main_forward(model, ids_bt: jax.Array, pos_bt: jax.Array, seg_bt: jax.Array, cache: dict):
    """The main model on the cache, without MTP: (logits (B, T, V), pre-norm hidden (B, T, D), cache).

    A model with FP8 weights decodes on its stacked layers in a rolled `lax.scan` (`_scan_layers`), compiled with
    `FP8_COMPILER_OPTIONS`: each layer's weights are dequantised inside the loop body, one layer's copies live at
    a time. Unrolled (as `Transformer.__call__` runs layers on the cache), each dequantisation depends on the
    weights alone and XLA schedules them all first, every copy live at once (the 671B decode step compiled to
    ~5x its weights in temporaries)."""
    if model.per_layer or not has_fp8(model):
        out = model(ids_bt, positions=pos_bt, segment_ids=seg_bt, cache=cache, mtp=False)
        return out.logits, out.hidden, out.cache
    consts = block_consts(pos_bt, seg_bt, model.cfg)
    x_btd = constrain(model.embed(ids_bt), ("batch", "seq", "act_embed"))
    new_cache = {}
    for name, stack in (("dense", model.dense_layers), ("moe", model.moe_layers)):
        if stack is not None:
            x_btd, new_cache[name] = _scan_layers(stack, x_btd, consts, cache[name])
    return model.head(model.norm(x_btd)), x_btd, new_cache


def _scan_layers(stack, x_btd: jax.Array, consts: tuple, cache):
    """A stacked Block over its layers in a rolled loop, layer i on cache[i]; returns (x, new stacked cache)."""
    graphdef, state = nnx.split(stack)

    def body(x, layer):
        layer_state, layer_cache = layer
        x, _, layer_cache = nnx.merge(graphdef, layer_state)(x, *consts, cache=layer_cache)
        return x, layer_cache

    return jax.lax.scan(body, x_btd, (state, cache))


# XLA options for programs on FP8 weights: no loop-invariant code motion. The conversions of the E4M3 weights
# depend on loop-invariant inputs alone, and hoisted out of the decode loop (and the layer loop) they would keep a
# dequantised copy of every weight live for the whole loop: the 671B decode step compiled to 4x its weights in
# temporaries with it, and to one layer's dequantised copies without it (docs/sampling.md).
FP8_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def mtp_draft(model, next_ids_bt: jax.Array, hidden_btd: jax.Array, pos_bt: jax.Array, mtp_cache,
              sel_b: jax.Array):
    """Depth-1 MTP at positions pos (`Transformer.mtp_step`): from the main pre-norm hidden h_t and the token t+1,
    the logits of token t+2 at ONE position per row, index sel_b (B,) into T: (B, V). Every position's entry is
    written to the MTP module's own cache. A cache entry is the latent of the block's input alone, so only the
    attention runs on all T positions; the MoE, the final norm and the head run on the selected token (half the
    MoE rows of the 2-token verify step, and none of the prompt's at prefill)."""
    module, rows = model.mtp[0], jnp.arange(next_ids_bt.shape[0])
    consts = block_consts(pos_bt, jnp.ones(pos_bt.shape, jnp.int32), model.cfg)
    x_btd = module.eh_proj(jnp.concatenate([module.enorm(model.embed(next_ids_bt)), module.hnorm(hidden_btd)], -1))
    blk = module.block  # Block.__call__, with the FFN on the selected token only
    h_btd, mtp_cache = blk.attn(blk.attn_norm(x_btd), *consts[:4], mtp_cache)
    x_b1d = constrain((x_btd + h_btd)[rows, sel_b][:, None], ("batch", "seq", "act_embed"))
    h_b1d, _ = blk.mlp(blk.mlp_norm(x_b1d), jnp.ones(x_b1d.shape[:2], bool), decoding=True)
    x_b1d = constrain(x_b1d + h_b1d, ("batch", "seq", "act_embed"))
    return model.head_logits(module.norm(x_b1d))[:, 0], mtp_cache


class Carry(NamedTuple):
    """Decode-loop state. tok_b is each row's last emitted token, not yet in the cache, at position pos_b."""

    cache: dict
    mtp_cache: list
    tok_b: jax.Array  # (B,) int32
    pos_b: jax.Array  # (B,) int32
    draft_b: jax.Array  # (B,) int32 MTP draft for position pos_b + 1 (speculative only)
    out_bu: jax.Array  # (B, U) int32 emitted tokens
    count_b: jax.Array  # (B,) int32 tokens emitted so far
    done_b: jax.Array  # (B,) bool
    key: jax.Array
    forwards: jax.Array  # () int32 main-model forward passes in the loop
    drafts: jax.Array  # () int32
    accepted: jax.Array  # () int32


def _emit(c: Carry, first_b, second_b, emit2_b, stop_ids, budget):
    """Append first (and second where emit2) to every active row; rows finish on a stop token or the budget."""
    rows = jnp.arange(first_b.shape[0])
    active = ~c.done_b
    n = c.out_bu.shape[1]
    out = c.out_bu.at[rows, jnp.where(active, c.count_b, n)].set(first_b, mode="drop")
    out = out.at[rows, jnp.where(emit2_b, c.count_b + 1, n)].set(second_b, mode="drop")
    n_new = active.astype(jnp.int32) + emit2_b.astype(jnp.int32)
    count = c.count_b + n_new
    last = jnp.where(emit2_b, second_b, first_b)
    done = c.done_b | (active & (jnp.isin(last, stop_ids) | (count >= budget)))
    return c._replace(out_bu=out, count_b=count, done_b=done, tok_b=jnp.where(active, last, c.tok_b),
                      pos_b=c.pos_b + n_new)


def _prefill_fn(graphdef, rule, speculative, slots, budget, state, ids_bt, lens_b, stop_ids, key, live_b=None):
    """Prefill, first token per row and (speculative) the first draft; returns the initial Carry. Rows where
    `live_b` (B,) is False (batch padding) start done."""
    model = nnx.merge(graphdef, *state)
    b = ids_bt.shape[0]
    rows = jnp.arange(b)
    logits, hidden, cache, mtp_cache = prefill(model, ids_bt, lens_b, slots)
    key, sub = jax.random.split(key)
    last_b = lens_b - 1
    first_b = sample_tokens(logits[rows, last_b], sub, rule)
    draft_b = jnp.zeros((b,), jnp.int32)
    if speculative:  # MTP over the prompt: entry t pairs h_t with token t+1 (the first new token at the end)
        shifted = jnp.concatenate([ids_bt[:, 1:], jnp.zeros((b, 1), ids_bt.dtype)], axis=1)
        shifted = shifted.at[rows, last_b].set(first_b)
        pos_bt = _not_constant(jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape))
        mtp_logits, mtp_c = mtp_draft(model, shifted, hidden, pos_bt, mtp_cache[0], last_b)
        mtp_cache = [mtp_c]
        draft_b = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)
    else:
        mtp_cache = []
    zero = jnp.zeros((), jnp.int32)
    done_b = jnp.zeros((b,), bool) if live_b is None else ~live_b
    c = Carry(split_rows(cache), split_rows(mtp_cache), first_b, last_b, draft_b, jnp.zeros((b, budget), jnp.int32),
              jnp.zeros((b,), jnp.int32), done_b, key, zero, zero, zero)
    return _emit(c, first_b, first_b, jnp.zeros((b,), bool), stop_ids, budget)


def _split_key(key: jax.Array, rule: SamplingRule) -> tuple[jax.Array, jax.Array]:
    """(next key, key for this step); greedy decoding draws nothing, so it skips the split (a threefry loop)."""
    return (key, key) if rule.temperature == 0 else tuple(jax.random.split(key))


def _plain_step(model, c: Carry, rule, stop_ids, budget) -> Carry:
    key, sub = _split_key(c.key, rule)
    logits, _, cache = decode_step(model, c.tok_b[:, None], c.pos_b[:, None], c.cache)
    nxt_b = sample_tokens(logits[:, 0], sub, rule)
    c = c._replace(cache=cache, key=key, forwards=c.forwards + 1)
    return _emit(c, nxt_b, nxt_b, jnp.zeros_like(c.done_b), stop_ids, budget)


def _speculative_step(model, c: Carry, rule, stop_ids, budget) -> Carry:
    """Verify [tok, draft] at [p, p+1]; emit y0 (the main model's token at p) and, if the draft was y0, also
    y1; then redraft with the MTP module from the hidden states just computed."""
    b = c.tok_b.shape[0]
    key, sub = _split_key(c.key, rule)
    pos_b2 = c.pos_b[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
    logits, hidden, cache = decode_step(model, jnp.stack([c.tok_b, c.draft_b], axis=1), pos_b2, c.cache)
    y_b2 = sample_tokens(logits.reshape(b * 2, -1), sub, rule).reshape(b, 2)
    active = ~c.done_b
    ok_b = y_b2[:, 0] == c.draft_b
    can2_b = active & (budget - c.count_b >= 2)  # a draft only counts when a second token could be emitted
    emit2_b = can2_b & ok_b & ~jnp.isin(y_b2[:, 0], stop_ids)
    # MTP entries p and p+1 pair h_p with y0 (token p+1) and h_{p+1} with y1 (token p+2, junk unless accepted)
    mtp_logits, mtp_c = mtp_draft(model, y_b2, hidden, pos_b2, c.mtp_cache[0], emit2_b.astype(jnp.int32))
    draft_b = jnp.argmax(mtp_logits, axis=-1).astype(jnp.int32)
    c = c._replace(cache=cache, mtp_cache=[mtp_c], key=key, draft_b=jnp.where(active, draft_b, c.draft_b),
                   forwards=c.forwards + 1, drafts=c.drafts + can2_b.sum(dtype=jnp.int32),
                   accepted=c.accepted + (can2_b & ok_b).sum(dtype=jnp.int32))
    return _emit(c, y_b2[:, 0], y_b2[:, 1], emit2_b, stop_ids, budget)


def _chunk_fn(graphdef, rule, speculative, state, carry: Carry, stop_ids, n_steps) -> Carry:
    """Up to n_steps decode steps in a while_loop; exits early when every row is done. The budget per row is
    the width of the output buffer."""
    step = _speculative_step if speculative else _plain_step
    n = carry.out_bu.shape[1]

    def cond(ci):
        c, i = ci
        return (i < n_steps) & ~jnp.all(c.done_b)

    def body(ci):
        c, i = ci
        return step(nnx.merge(graphdef, *state), c, rule, stop_ids, n), i + 1

    return jax.lax.while_loop(cond, body, (carry, jnp.zeros((), jnp.int32)))[0]


class _Hashed:
    """A static value with its hash computed once: a graphdef hashes its whole module tree (milliseconds for a real
    model), and each generate looks up two executables. Equal when the values are (the same object: at once)."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Hashed) and (self.value is other.value or self.value == other.value)


class Programs:
    """What `generate` keeps between calls: its AOT-compiled prefill and decode programs (keyed by static values
    and argument shapes, so a repeated request or an equal-structure model compiles nothing) and the per-layer view
    of the last model decoded. `generate` uses the shared `PROGRAMS` unless it is given its own."""

    def __init__(self, max_programs: int = 32):
        self.executables: dict = {}
        self.max_programs = max_programs
        self._view: tuple | None = None  # (the model's state leaves, graphdef, state) of the last model decoded

    def compiled(self, fn, static: tuple, args: tuple, donate: tuple = (), mesh=None, rules: dict | None = None):
        """fn(*static, *args) compiled once per (static values, argument shapes, mesh); returns (executable,
        seconds). A `_Hashed` static value keys by its stored hash and is passed to fn unwrapped. With a `mesh`,
        fn is traced with it and `rules` current (the layers' sharding constraints and MoE dispatch read them)."""
        leaves, treedef = jax.tree.flatten(args)
        rules_key = None if mesh is None else tuple(sorted((k, str(v)) for k, v in (rules or RULES).items()))
        key = (fn, static, treedef, tuple((np.shape(x), x.dtype if hasattr(x, "dtype") else type(x)) for x in leaves),
               mesh, rules_key)
        if key in self.executables:
            return self.executables[key], 0.0
        t0 = time.perf_counter()
        values = tuple(v.value if isinstance(v, _Hashed) else v for v in static)
        jitted = jax.jit(functools.partial(fn, *values), donate_argnums=donate)
        options = FP8_COMPILER_OPTIONS if any(x.dtype == jnp.float8_e4m3fn for x in leaves) else None
        if mesh is None:
            exe = jitted.lower(*args).compile(options)
        else:
            with jax.set_mesh(mesh), use_rules(rules or RULES):
                exe = jitted.lower(*args).compile(options)
        if len(self.executables) > self.max_programs:
            self.executables.clear()
        self.executables[key] = exe
        return exe, time.perf_counter() - t0

    def decode_state(self, model):
        """graphdef (as a `_Hashed`) and (params, router bias, rest) of `unstacked(model)`: per-layer weight arrays,
        which the compiled loop reads in place (from the stacked weights it would copy each layer's slice on every
        step); a model with FP8 weights as it is (`main_forward`). The view is made once per model and reused while
        the model's arrays are the same objects."""
        leaves = jax.tree.leaves(nnx.state(model))
        if self._view and len(self._view[0]) == len(leaves) and all(a is b for a, b in zip(self._view[0], leaves)):
            return self._view[1], self._view[2]
        # FP8 weights stay stacked (`main_forward` scans them) and W_kb / W_vb are sliced from the FP8 kv_b_proj
        view = model if has_fp8(model) else unstacked(model)
        graphdef, *state = nnx.split(view, nnx.Param, RouterBias, ...)
        self._view = (leaves, _Hashed(graphdef), tuple(state))
        return self._view[1], self._view[2]


PROGRAMS = Programs()


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  rule: SamplingRule = SamplingRule(), stop_tokens: Sequence[int] = (),
                  speculative: str | None = None, chunk_size: int = 16) -> None:
    """Raise GenerateError (one line, naming the prompt, token id or setting) for a request `generate` rejects."""
    rule.validate()
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerateError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise GenerateError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                                f"{len(p) + max_new_tokens} positions, beyond model.max_position_embeddings="
                                f"{cfg.max_position_embeddings}")
    bad_stop = [s for s in stop_tokens if not 0 <= int(s) < cfg.vocab_size]
    if bad_stop:
        raise GenerateError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if speculative not in (None, "mtp"):
        raise GenerateError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative and cfg.num_nextn_predict_layers < 1:
        raise GenerateError("speculative='mtp' needs an MTP module (model.num_nextn_predict_layers is 0)")
    if chunk_size < 1:
        raise GenerateError(f"chunk_size must be >= 1, got {chunk_size}")


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
             speculative: str | None = None, on_tokens: Callable[[list[list[int]]], None] | None = None,
             chunk_size: int = 16, programs: Programs = PROGRAMS, mesh=None,
             rules: dict | None = None) -> GenerateResult:
    """Generate up to `max_new_tokens` per prompt (lists of token ids, any lengths). `on_tokens(new)` receives
    each row's tokens emitted since its previous call, once after prefill and then every `chunk_size` steps.
    `mesh`: decode sharded over it (the model's parameters placed on it, e.g. by `hf.load(mesh=)`), with `rules`
    (default `DECODE_RULES`)."""
    cfg: ModelConfig = model.cfg
    rule = SamplingRule(float(temperature), int(top_k), float(top_p))
    check_request(cfg, prompts, max_new_tokens, rule, stop_tokens, speculative, chunk_size)

    n_req, spec = len(prompts), speculative == "mtp"
    rules = (rules or DECODE_RULES) if mesh is not None else None
    rows = 1 if mesh is None else logical_size(mesh, "batch", rules)
    prompts = list(prompts) + [prompts[0]] * (round_up(n_req, rows) - n_req)  # copies route like row 0
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    t = round_up(int(lens.max()), 16)  # bucketed so nearby prompt lengths share one compiled prefill
    ids = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    slots = round_up(t + max_new_tokens + 1, 64)  # speculative verification writes one slot past the last token
    graphdef, state = programs.decode_state(model)
    stop_ids = sorted({int(s) for s in stop_tokens})
    stop = np.full((round_up(max(len(stop_ids), 1), 8),), -1, np.int32)  # -1 pads; bucketed to share compiles
    stop[: len(stop_ids)] = stop_ids

    args = (state, ids, lens, stop, jax.random.key(seed), np.arange(b) < n_req)
    prefill_exe, compile_s = programs.compiled(_prefill_fn, (graphdef, rule, spec, slots, max_new_tokens), args,
                                               mesh=mesh, rules=rules)
    t0 = time.perf_counter()
    carry = jax.block_until_ready(prefill_exe(*args))
    prefill_s = time.perf_counter() - t0

    seen = [0] * n_req

    def stream(c: Carry) -> None:
        out, count = jax.device_get((c.out_bu, c.count_b))
        new = [out[i, seen[i]: count[i]].tolist() for i in range(n_req)]
        seen[:] = count[:n_req].tolist()
        on_tokens(new)

    if on_tokens is not None:
        stream(carry)
    n_steps = np.int32(chunk_size if on_tokens is not None else max_new_tokens)
    chunk_args = (state, carry, stop, n_steps)
    chunk_exe, chunk_compile_s = programs.compiled(_chunk_fn, (graphdef, rule, spec), chunk_args, donate=(1,),
                                                   mesh=mesh, rules=rules)
    compile_s += chunk_compile_s
    t0 = time.perf_counter()
    while not bool(jax.device_get(carry.done_b).all()):
        carry = chunk_exe(state, carry, stop, n_steps)
        if on_tokens is not None:
            stream(carry)
    out, count, done_stop, forwards, drafts, accepted = jax.device_get(
        (carry.out_bu, carry.count_b, jnp.isin(carry.tok_b, stop), carry.forwards, carry.drafts, carry.accepted))
    decode_s = time.perf_counter() - t0

    tokens = [out[i, : count[i]].tolist() for i in range(n_req)]
    new_tokens = int(count.sum())  # padding rows emit nothing
    timing = {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": new_tokens,
              "prompt_tokens": int(lens[:n_req].sum()), "decode_forwards": int(forwards),
              "tokens_per_s": new_tokens / max(prefill_s + decode_s, 1e-9),
              "decode_tokens_per_s": (new_tokens - n_req) / max(decode_s, 1e-9)}
    drafts, accepted = int(drafts), int(accepted)
    return GenerateResult(tokens, ["stop" if s else "length" for s in done_stop[:n_req]], timing,
                          accepted / drafts if spec and drafts else None, drafts, accepted)
