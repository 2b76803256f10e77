"""The DeepSeek-V3 transformer: blocks stacked and scanned (dense prefix, then MoE layers), final norm, untied head,
and the multi-token-prediction (MTP) modules that share the embedding and the head.

forward(input_ids) -> ModelOutput(logits, mtp_logits, aux, ...). `aux` carries, per MoE layer, the expert token
counts that the train step turns into the bias update, and the sequence-wise balance-loss terms.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ImplConfig, ModelConfig
from dsv3_jax.kernels import precision
from dsv3_jax.kernels.accumulating_scan import accumulating_scan
from dsv3_jax.kernels.chunked_ce import chunked_token_losses
from dsv3_jax.kernels.latent_attention import LatentCache
from dsv3_jax.kernels.precision import policy
from dsv3_jax.model.layers import MLP, Embed, Linear, RMSNorm
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.moe import MoE
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.routing import RouterBias
from dsv3_jax.parallel.data_parallel import GATHER, gather, gather_params
from dsv3_jax.parallel.sharding import constrain, state_shardings

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits: jax.Array  # (B, T, V)
    mtp_logits: jax.Array | None  # (M, B, T, V); depth k is valid at positions t < T - k
    aux: dict  # expert_counts (L_moe, E), balance_loss (L_moe,), expert_affinity (L_moe, E), dropped_rows (L_moe,),
    #            mtp_expert_counts (M, E),
    #            mtp_balance_loss, mtp_expert_affinity, router_counts (the counts in the structure of the RouterBias
    #            state)
    hidden: jax.Array  # (B, T, D) last hidden state before the final norm
    cache: Any = None  # updated latent caches when decoding
    hidden_states: jax.Array | None = None  # (L, B, T, D) output of every layer when requested
    normed: jax.Array | None = None  # (B, T, D) after the final norm, in place of logits (return_logits=False)
    mtp_normed: jax.Array | None = None  # (M, B, T, D) each MTP module's normed output, in place of mtp_logits


class Block(nnx.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(x)) with a dense SwiGLU or the MoE."""

    def __init__(self, cfg: ModelConfig, impl: ImplConfig, moe: bool, rngs: nnx.Rngs):
        pol = policy(impl)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pol, rngs)
        self.attn = MLA(cfg, impl, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pol, rngs)
        self.mlp = MoE(cfg, impl, rngs) if moe else MLP(cfg, cfg.intermediate_size, pol, rngs)
        self.is_moe = moe

    def __call__(self, x_btd, cos, sin, segment_ids, positions, valid, cache=None):
        with jax.named_scope("attention"):
            h, cache = self.attn(self.attn_norm(x_btd), cos, sin, segment_ids, positions, cache)
        x_btd = constrain(x_btd + h, ("batch", "seq", "act_embed"))
        with jax.named_scope("moe" if self.is_moe else "mlp"):
            if self.is_moe:  # on the cache a handful of tokens skip the training dispatch
                h, aux = self.mlp(self.mlp_norm(x_btd), valid, decoding=cache is not None)
            else:
                h, aux = self.mlp(self.mlp_norm(x_btd)), {}
        return constrain(x_btd + h, ("batch", "seq", "act_embed")), aux, cache


def block_consts(positions_bt: jax.Array, segment_ids_bt: jax.Array, cfg: ModelConfig) -> tuple:
    """What every block takes besides x: rotary cos/sin, segment ids, positions and the non-padding mask."""
    cos, sin = rope_cos_sin(positions_bt, cfg)
    return cos, sin, segment_ids_bt, positions_bt, segment_ids_bt != 0


def input_mtp_mask(segment_ids_bt: jax.Array, depth: int) -> jax.Array:
    """(M, B, T): depth k at position t sees its input token t+k inside the same non-padding document. The default
    MTP mask when the caller (who alone sees the target column T) gives none."""
    b, t = segment_ids_bt.shape
    rows = []
    for k in range(1, depth + 1):
        n = max(t - k, 0)
        ok = segment_ids_bt[:, :n] != 0
        for j in range(1, k + 1):
            ok = ok & (segment_ids_bt[:, j:j + n] == segment_ids_bt[:, :n])
        rows.append(jnp.concatenate([ok, jnp.zeros((b, t - n), bool)], axis=1))
    return jnp.stack(rows)


def stacked(make, n: int, rngs: nnx.Rngs):
    """n independently initialised copies of a module, parameters stacked on a leading layer axis."""
    if n == 0:
        return None
    keys = jax.random.split(rngs.params(), n)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys)
    return nnx.merge(graphdef, state)


def scan_blocks(stack: Block, x_btd, consts, cache: LatentCache | None, impl: ImplConfig, keep_hidden: bool,
                grad_acc: dict | None = None):
    """Run a stacked Block over its layer axis with lax.scan: compile time independent of depth; unrolled on the
    cache and when `impl.scan_layers` is false. With `grad_acc` (a pure dict like this stack's parameters; training
    under `impl.remat: full`), the weights' gradient comes out as `grad_acc` plus their gradient, added layer by
    layer in place (kernels/accumulating_scan.py)."""
    if grad_acc is not None and cache is None:
        return _accumulating_blocks(stack, x_btd, consts, keep_hidden, grad_acc)
    graphdef, state = nnx.split(stack)

    def body(x, layer):
        layer_state, layer_cache = layer
        layer_state = gather_params(layer_state)  # this layer's weights whole, in a data-parallel region
        x, aux, layer_cache = nnx.merge(graphdef, layer_state)(x, *consts, cache=layer_cache)
        return x, (aux, layer_cache, x if keep_hidden else None)

    if impl.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[impl.remat], prevent_cse=False)
    # On the cache (prefill, decode) the layers are unrolled: a scan slices every layer's weights out of the stack
    # on each step, which at a handful of tokens costs more than the layer itself. Training unrolls only when asked:
    # the scan's weight slices, stacked residuals and stacked weight gradients are copies, but unrolled, compile
    # time grows with depth.
    return jax.lax.scan(body, x_btd, (state, cache), unroll=cache is not None or not impl.scan_layers)


def _accumulating_blocks(stack: Block, x_btd, consts, keep_hidden: bool, grad_acc: dict):
    graphdef, weights, rest = nnx.split(stack, nnx.Param, ...)
    flat, tree = jax.tree_util.tree_flatten_with_path(weights)
    acc_flat, acc_tree = jax.tree_util.tree_flatten_with_path(grad_acc)
    names = [jax.tree_util.keystr(k).removesuffix(".value") for k, _ in flat]
    if names != [jax.tree_util.keystr(k) for k, _ in acc_flat]:
        raise ValueError(f"grad_acc does not match the stack's parameters: {names} vs {acc_tree}")
    acc = jax.tree.unflatten(tree, [a for _, a in acc_flat])

    def body(x, w, consts, rest_l):
        layer = nnx.merge(graphdef, gather_params(w), gather_params(rest_l))
        x, aux, _ = layer(x, *consts, cache=None)
        return x, (aux, None, x if keep_hidden else None)

    return accumulating_scan(body, x_btd, weights, acc, consts, rest)


def unstack(stack: Block) -> nnx.List:
    """The layers of a stacked Block as a list of Blocks, each with its own weight arrays (see `unstacked`)."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)])


def run_layers(blocks: nnx.List, x_btd, consts, cache: list | None, keep_hidden: bool):
    """Unstacked blocks one after another, layer i on cache[i]; returns what `scan_blocks` returns, the cache as a
    list. The decode path: inside a compiled decode loop XLA:CPU copies every layer's slice out of a stacked weight
    on every step (unrolled scan or not), a large share of a small model's decode step."""
    auxs, caches, hs = [], [], []
    for i, block in enumerate(blocks):
        x_btd, aux, c = block(x_btd, *consts, cache=None if cache is None else cache[i])
        auxs.append(aux)
        caches.append(c)
        hs.append(x_btd)
    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxs)
    return x_btd, (aux, caches if cache is not None else None, jnp.stack(hs) if keep_hidden else None)


class MTPModule(nnx.Module):
    """Depth-k MTP: h' = W_eh [RMSNorm(Emb(t_{t+k})) ; RMSNorm(h^{k-1}_t)], one MoE block, own final norm."""

    def __init__(self, cfg: ModelConfig, impl: ImplConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        pol = policy(impl)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, pol, rngs)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, pol, rngs)
        self.eh_proj = Linear("bti,id->btd", (2 * d, d), ("mlp", "embed"), cfg, pol, rngs)
        self.block = Block(cfg, impl, moe=True, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, pol, rngs)

    def __call__(self, emb_btd, h_btd, consts, cache=None):
        h = self.eh_proj(jnp.concatenate([self.enorm(emb_btd), self.hnorm(h_btd)], axis=-1))
        h, aux, cache = self.block(h, *consts, cache=cache)
        return h, aux, cache


class Transformer(nnx.Module):
    """DeepSeek-V3: embedding, dense blocks, MoE blocks, final norm, head, MTP modules."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, impl: ImplConfig | None = None):
        impl = impl or ImplConfig()
        pol = policy(impl)
        self.cfg, self.impl = cfg, impl
        self.embed = Embed(cfg, pol, rngs)
        self.dense_layers = stacked(lambda r: Block(cfg, impl, False, r), cfg.first_k_dense_replace, rngs)
        self.moe_layers = stacked(lambda r: Block(cfg, impl, True, r), cfg.num_moe_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pol, rngs)
        self.head = Linear("btd,dv->btv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, pol.high(),
                           rngs)
        self.mtp = nnx.List([MTPModule(cfg, impl, rngs) for _ in range(cfg.num_nextn_predict_layers)])
        self.per_layer = False  # True on a decode view (`unstacked`): each stack is a list of per-layer Blocks

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: dict | None = None, *, mtp: bool = True,
                 mtp_valid: jax.Array | None = None, return_hidden_states: bool = False,
                 return_logits: bool = True, grad_acc: dict | None = None) -> ModelOutput:
        """input_ids (B, T). positions default to 0..T-1 and segment_ids to all-ones (one document per row;
        0 marks padding). With `cache` (see `init_cache`), new tokens are written at `positions`.

        mtp_valid (M, B, T): where depth k has a target (the train step passes `losses.mtp_target_mask`);
        only those positions enter the MTP expert counts and balance loss. By default a position counts when its
        input token t+k exists in the same document (the model cannot see the target column itself).

        return_logits=False (training with `impl.vocab_chunk`): no logits; `normed` and `mtp_normed` carry the
        head's inputs for `head_cross_entropy`.

        grad_acc (training under `impl.remat: full`): gradient accumulators for the stacked layers (`dense_layers`,
        `moe_layers` of the parameters' pure dict); their weights' gradients come out with the accumulator added
        (`scan_blocks`)."""
        cfg = self.cfg
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        consts = block_consts(positions, segment_ids, cfg)
        cache = cache or {}
        new_cache = {}

        x = constrain(self.embed(input_ids), ("batch", "seq", "act_embed"))
        hidden_states, aux = [], {}
        for name, stack in (("dense", self.dense_layers), ("moe", self.moe_layers)):
            if stack is None:
                continue
            run = run_layers if self.per_layer else functools.partial(
                scan_blocks, impl=self.impl, grad_acc=(grad_acc or {}).get(f"{name}_layers"))
            x, (layer_aux, layer_cache, hs) = run(stack, x, consts, cache.get(name), keep_hidden=return_hidden_states)
            new_cache[name] = layer_cache
            hidden_states.append(hs)
            if name == "moe":
                aux = {k: layer_aux[k] for k in ("expert_counts", "balance_loss", "expert_affinity", "dropped_rows")}
        if not aux:
            aux = {"expert_counts": jnp.zeros((0, cfg.n_routed_experts)), "balance_loss": jnp.zeros((0,)),
                   "expert_affinity": jnp.zeros((0, cfg.n_routed_experts)), "dropped_rows": jnp.zeros((0,), jnp.int32)}
        hidden = x
        normed = self.norm(x)
        logits = self.head_logits(normed) if return_logits else None

        mtp_logits = None
        if mtp and len(self.mtp):
            if mtp_valid is None:
                mtp_valid = input_mtp_mask(segment_ids, len(self.mtp))
            h, all_logits, counts, balance, affinity, mtp_caches = x, [], [], [], [], []
            mtp_cache = cache.get("mtp") or [None] * len(self.mtp)
            for k in range(1, len(self.mtp) + 1):
                # token t+k at position t; the last k positions have no such token (fed 0, masked by mtp_valid)
                shifted = jnp.concatenate([input_ids[:, k:], jnp.zeros((b, min(k, t)), input_ids.dtype)], axis=1)
                h, lg, m_aux, c = self.mtp_step(k, shifted, h, consts[:-1] + (mtp_valid[k - 1],), mtp_cache[k - 1],
                                                return_logits)
                mtp_caches.append(c)
                all_logits.append(lg)
                counts.append(m_aux["expert_counts"])
                balance.append(m_aux["balance_loss"])
                affinity.append(m_aux["expert_affinity"])
            mtp_logits = jnp.stack(all_logits)  # (M, B, T, V), or (M, B, T, D) normed without logits
            aux["mtp_expert_counts"] = jnp.stack(counts)
            aux["mtp_balance_loss"] = jnp.stack(balance)
            aux["mtp_expert_affinity"] = jnp.stack(affinity)
            new_cache["mtp"] = mtp_caches
        aux["router_counts"] = self.router_counts(aux)
        hs = jnp.concatenate([h for h in hidden_states if h is not None]) if return_hidden_states else None
        if return_logits:
            return ModelOutput(logits, mtp_logits, aux, hidden, new_cache if cache else None, hs)
        return ModelOutput(None, None, aux, hidden, new_cache if cache else None, hs, normed, mtp_logits)

    def router_counts(self, aux: dict) -> dict:
        """The expert counts of `aux` in the structure of `nnx.to_pure_dict(nnx.state(self, RouterBias))`: each
        RouterBias the filter finds gets the counts of the MoE layer that owns it (matched by identity, not by path),
        so the train step pairs counts and biases by tree structure. Without MTP counts, the MTP biases are left out."""
        owners = {}
        if self.moe_layers is not None and self.per_layer:
            owners.update((id(block.mlp.bias), aux["expert_counts"][i]) for i, block in enumerate(self.moe_layers))
        elif self.moe_layers is not None:
            owners[id(self.moe_layers.mlp.bias)] = aux["expert_counts"]
        if "mtp_expert_counts" in aux:
            owners.update((id(m.block.mlp.bias), aux["mtp_expert_counts"][k]) for k, m in enumerate(self.mtp))
        biases = nnx.state(self, RouterBias)
        kept = nnx.filter_state(biases, lambda _, v: id(v) in owners)
        counts = jax.tree.map(lambda v: owners[id(v)], kept, is_leaf=lambda x: isinstance(x, RouterBias))
        return nnx.to_pure_dict(counts)

    def main_router_bias(self) -> jax.Array:
        """The main MoE layers' router bias (L_moe, E); (0, E) without MoE layers."""
        if self.moe_layers is None:
            return jnp.zeros((0, self.cfg.n_routed_experts), jnp.float32)
        if self.per_layer:
            return jnp.stack([block.mlp.bias[...] for block in self.moe_layers])
        return self.moe_layers.mlp.bias[...]

    def mtp_step(self, k: int, next_ids_bt: jax.Array, h_btd: jax.Array, consts: tuple, cache=None,
                 return_logits: bool = True):
        """MTP depth k (1-based) at every position t: from h^{k-1}_t and the token t+k (next_ids_bt), the new
        hidden h^k_t and the logits of token t+k+1 through the shared head. The training forward and speculative
        drafting both call this. Returns (h^k (B, T, D), logits (B, T, V), aux, cache); without logits the head's
        input (B, T, D) in their place."""
        module = self.mtp[k - 1]
        h_btd, aux, cache = module(self.embed(next_ids_bt), h_btd, consts, cache=cache)
        normed = module.norm(h_btd)
        return h_btd, self.head_logits(normed) if return_logits else normed, aux, cache

    def head_logits(self, normed_btd: jax.Array) -> jax.Array:
        """(B, T, V) logits through the untied head, its weight gathered whole where it came in on shards."""
        w = self.head.weight
        axes = w.get_metadata().get(GATHER)
        return precision.einsum(self.head.spec, normed_btd, gather(w.get_value(), axes) if axes else w[...],
                                self.head.policy)

    def head_cross_entropy(self, normed_btd: jax.Array, targets_bt: jax.Array,
                           mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`losses.cross_entropy_sum` of the head's logits on `normed_btd` (sum, count), computed over
        `impl.vocab_chunk` columns at a time (kernels/chunked_ce.py): no (B, T, V) logits, and a head that came in on
        D shards (the data-parallel region) gathered one chunk of columns at a time."""
        return self.head_cross_entropies([(normed_btd, targets_bt, mask_bt)])[0]

    def head_cross_entropies(self, items: list[tuple]) -> list[tuple[jax.Array, jax.Array]]:
        """`head_cross_entropy` of several (normed (B, T_i, D), targets, mask) items (the main loss and each MTP
        depth) in one pass over the vocabulary: the head's chunks are gathered once for all of them."""
        w = self.head.weight
        axes = w.get_metadata().get(GATHER) or ((), ())
        w_dv = gather(w.get_value(), ((), axes[1]))  # whole over V: the chunks slice it; the D shards stay
        d = items[0][0].shape[-1]
        flat = [(x.reshape(-1, d), t.reshape(-1), m.reshape(-1).astype(jnp.float32)) for x, t, m in items]
        h_nd, targets_n, mask_n = (jnp.concatenate(c) for c in zip(*flat))
        per_row = chunked_token_losses(h_nd, w_dv, targets_n, mask_n, self.impl.vocab_chunk or self.cfg.vocab_size,
                                       self.head.policy, tuple(axes[0]))
        out, start = [], 0
        for _, _, m in flat:
            out.append((per_row[start:start + m.shape[0]].sum(), m.sum()))
            start += m.shape[0]
        return out

    def init_cache(self, batch: int, slots: int, dtype=None) -> dict:
        """Empty latent caches for every layer (and MTP module): (c_kv, k_rope) per token and layer."""
        cfg, dtype = self.cfg, dtype or self.impl.dtype
        cache = {}
        for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers)):
            if n:  # unstacked layers (`unstacked`) take one cache per layer
                cache[name] = ([LatentCache.zeros(cfg, batch, slots, None, dtype) for _ in range(n)]
                               if self.per_layer else LatentCache.zeros(cfg, batch, slots, n, dtype))
        if cfg.num_nextn_predict_layers:
            cache["mtp"] = [LatentCache.zeros(cfg, batch, slots, None, dtype)
                            for _ in range(cfg.num_nextn_predict_layers)]
        return cache


def unstacked(model: Transformer) -> Transformer:
    """The same model (shared arrays outside the blocks) with its stacked blocks split into per-layer Blocks
    (`unstack`) and every MLA's absorbed weights kept (`MLA.keep_absorbed`): copies that a decode loop reads in
    place."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    for name in ("dense_layers", "moe_layers"):
        if getattr(view, name) is not None:
            setattr(view, name, unstack(getattr(view, name)))
    view.per_layer = True
    for mla in [m for _, m in nnx.iter_graph(view) if isinstance(m, MLA)]:
        mla.keep_absorbed()
    return view


def create(cfg: ModelConfig, seed: int = 0, mesh=None, impl: ImplConfig | None = None) -> Transformer:
    """A freshly initialised model, built by one jitted init so that the parameters are created directly in their
    shardings when a mesh is given (a model larger than one device never materialises on one). Init runs once,
    so it is compiled without backend optimisation: on CPU that cuts its compile time about 4x."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(seed), impl))
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None if mesh is None else state_shardings(abstract_state, mesh)
    init = jax.jit(lambda: nnx.split(Transformer(cfg, nnx.Rngs(seed), impl))[1], out_shardings=out_shardings)
    state = init.lower().compile(compiler_options={"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)
