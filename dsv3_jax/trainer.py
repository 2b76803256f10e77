"""TrainState, the pure jitted train step, evaluation and the training loop with metrics and checkpoints.

The train state (`state.py`) is plain pytrees: `params` and `bias` are pure dicts that `nnx.merge(graphdef, params,
bias)` turns back into a model inside jit. Gradients are taken with respect
to `params` only; the router bias is updated afterwards from the expert counts the forward pass returns, counted
over the whole global batch (a global jax.Array: the sum over the batch axis spans every shard and process) and
summed over micro-batches. Under remat the counts are forward outputs, so recomputation cannot count them twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax import checkpoint, losses, metrics
from dsv3_jax.config import Config, ConfigError, TrainConfig
from dsv3_jax.moe import max_violation, update_bias
from dsv3_jax.sharding import constrain, expert_axis_size, logical_spec, make_mesh, mesh_axes, rules_for, use_rules
from dsv3_jax.state import (  # noqa: F401  (re-exported: the trainer's API)
    TrainState,
    abstract_state,
    decay_mask,
    init_state,
    learning_rate,
    make_optimizer,
    opt_state_shardings,
    sharded_abstract_state,
    split_abstract,
)

BATCH_KEYS = ("tokens", "segment_ids", "positions")


# ----------------------------------------------------------------------------------------------------------------
# Schedules and the optimizer.


def mtp_lambda(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    switch = cfg.mtp_lambda_switch_step
    return jnp.asarray(cfg.mtp_lambda if switch is None else jnp.where(step < switch, cfg.mtp_lambda,
                                                                         cfg.mtp_lambda_late), jnp.float32)


def bias_gamma(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    """The bias speed; 0 (bias frozen at its initial zeros) unless the balancing strategy is aux_free."""
    if cfg.balance != "aux_free":
        return jnp.zeros((), jnp.float32)
    stop = cfg.bias_gamma_stop_step
    return jnp.asarray(cfg.bias_gamma if stop is None else jnp.where(step < stop, cfg.bias_gamma, 0.0), jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# State creation (already sharded) and the abstract state for restores.


# ----------------------------------------------------------------------------------------------------------------
# The step.


def update_router_bias(bias: dict, counts: dict, gamma: jax.Array) -> dict:
    """Apply `moe.update_bias` to every router from the global-batch counts: `counts` has the structure of `bias`
    (`Transformer.router_counts`), so each layer's counts meet its own bias by tree structure, not by path."""
    return jax.tree.map(lambda b, c: update_bias(b, c, gamma), bias, counts)


def forward(graphdef, params, bias, batch: dict, mtp: bool = True):
    """The model on the input columns [:, :-1] of a packed batch; MTP counts only positions with a target."""
    model = nnx.merge(graphdef, params, bias)
    depth = len(model.mtp)
    mtp_valid = losses.mtp_target_mask(batch["segment_ids"], depth) if mtp and depth else None
    return model(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                 segment_ids=batch["segment_ids"][:, :-1], mtp=mtp, mtp_valid=mtp_valid)


def train_step(state: TrainState, batch: dict, graphdef, tx: optax.GradientTransformation,
               cfg: Config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (B, T+1), accumulating gradients over `micro_batches`."""
    tcfg, depth = cfg.train, cfg.model.num_nextn_predict_layers
    m = tcfg.micro_batches
    seg = batch["segment_ids"]
    n_tok = jnp.maximum(losses.same_document_mask(seg, 0).sum(), 1).astype(jnp.float32)
    n_mtp = jnp.stack([losses.same_document_mask(seg, k).sum() for k in range(1, depth + 1)]) if depth else \
        jnp.zeros((0,))
    n_mtp = jnp.maximum(n_mtp, 1).astype(jnp.float32)  # (M,) targets per MTP depth in the whole global batch
    lam, gamma = mtp_lambda(state.step, tcfg), bias_gamma(state.step, tcfg)

    def micro_loss(params, mb):
        out = forward(graphdef, params, state.bias, mb)
        ce_sum, _ = losses.next_token_loss(out.logits, mb["tokens"], mb["segment_ids"])
        ce = ce_sum / n_tok
        if depth:
            sums, _ = losses.mtp_losses(out.mtp_logits, mb["tokens"], mb["segment_ids"])
            mtp_ce = sums / n_mtp
            mtp_counts = out.aux["mtp_expert_counts"]
        else:
            mtp_ce, mtp_counts = jnp.zeros((0,)), jnp.zeros((0, cfg.model.n_routed_experts))
        bal = losses.balance_loss(out.aux, tcfg.balance_alpha) / m
        aux_bal = losses.aux_balance_loss(out.aux, tcfg.aux_loss_alpha, cfg.model.num_experts_per_tok) / m \
            if tcfg.balance == "aux_loss" else jnp.zeros((), jnp.float32)
        total = ce + losses.mtp_loss(mtp_ce, lam) + bal + aux_bal
        return total, {"ce": ce, "mtp_ce": mtp_ce, "balance": bal, "aux_balance": aux_bal,
                       "counts": out.aux["expert_counts"],
                       "mtp_counts": mtp_counts, "router_counts": out.aux["router_counts"]}

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    # (B, ...) -> (m, B/m, ...) taking rows i, i+m, ...: each micro-batch keeps the batch sharding of dim 0
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)

    def body(acc, mb):
        mb = {k: constrain(v, ("batch", "seq")) for k, v in mb.items()}
        (total, aux), grads = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, acc, (total, aux, grads)), None

    (total_shape, aux_shape), grads_shape = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (total_shape, aux_shape, grads_shape))
    (total, aux, grads), _ = jax.lax.scan(body, zeros, micro)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bias = update_router_bias(state.bias, aux["router_counts"], gamma)
    maxvio = max_violation(aux["counts"])  # (L_moe,)
    all_bias = jnp.concatenate([b.reshape(-1) for b in jax.tree.leaves(bias)] or [jnp.zeros((1,))])
    out = {
        "loss": aux["ce"], "total_loss": total, "mtp_loss": aux["mtp_ce"].mean() if depth else jnp.zeros(()),
        "balance_loss": aux["balance"], "grad_norm": grad_norm, "lr": learning_rate(state.step, tcfg),
        "mtp_lambda": lam, "bias_gamma": gamma, "maxvio": maxvio,
        "maxvio_mean": maxvio.mean() if aux["counts"].shape[0] else jnp.zeros(()),
        "dead_experts": (aux["counts"] == 0).sum(), "bias_mean": all_bias.mean(), "bias_std": all_bias.std(),
        "tokens": n_tok, "routed_tokens": aux["counts"].sum(-1),  # (L_moe,) = valid tokens x K when counted once
        "aux_balance_loss": aux["aux_balance"],
        # (L_moe, E) each: load c_i / mean(c) and the router bias after the update, for plots (metrics.layer_matrix)
        "expert_load": aux["counts"] / jnp.maximum(aux["counts"].mean(-1, keepdims=True), 1e-9),
        "router_bias": moe_bias(bias, aux["counts"].shape),
    }
    if depth:
        out["mtp_maxvio"] = max_violation(aux["mtp_counts"])
        out["mtp_routed_tokens"] = aux["mtp_counts"].sum(-1)  # (M,) = MTP targets x K
    return TrainState(state.step + 1, params, bias, opt_state), out


def moe_bias(bias: dict, shape: tuple) -> jax.Array:
    """The main MoE layers' router bias (L_moe, E) from the bias state (zeros (0, E) without MoE layers)."""
    b = bias.get("moe_layers", {}).get("mlp", {}).get("bias")
    return jnp.zeros(shape, jnp.float32) if b is None else b


def jit_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, mesh, abstract: TrainState,
                   donate: bool = True):
    """`train_step` jitted as the trainer runs it (and the planner compiles it): the new state keeps the state's
    shardings (left to propagation, the optimizer moments came back replicated), metrics replicated."""
    return jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, abstract), NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=(0,) if donate else ())


def eval_step(params: dict, bias: dict, batch: dict, graphdef) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies, number of targets) on one batch, without MTP."""
    out = forward(graphdef, params, bias, batch, mtp=False)
    return losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Checks that run before anything in the run dir is touched.


def data_parallel_size(mesh) -> int:
    """How many ways the batch is split: the product of the mesh axes the `batch` rule maps to."""
    return math.prod(mesh.shape[a] for a in mesh_axes("batch"))


def check_run(cfg: Config, mesh) -> None:
    """Shape checks across config sections and the mesh, with one-line errors naming the fields."""
    t, b = cfg.train, cfg.train.global_batch_size
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_position_embeddings "
                          f"({cfg.model.max_position_embeddings})")
    dp = data_parallel_size(mesh)
    if b % dp:
        raise ConfigError(f"train.global_batch_size ({b}) is not divisible by the data-parallel size {dp} "
                          f"(mesh {'*'.join(mesh_axes('batch'))} = {dict(mesh.shape)})")
    if (b // t.micro_batches) % dp:
        raise ConfigError(f"the micro-batch size ({b} / train.micro_batches {t.micro_batches}) is not divisible "
                          f"by the data-parallel size {dp}")
    if b % jax.process_count():
        raise ConfigError(f"train.global_batch_size ({b}) is not divisible by the {jax.process_count()} processes")
    ep = expert_axis_size(mesh)
    if cfg.model.n_routed_experts % ep:
        raise ConfigError(f"model.n_routed_experts ({cfg.model.n_routed_experts}) is not divisible by the expert "
                          f"axis size {ep} (mesh {'*'.join(mesh_axes('experts'))} = {dict(mesh.shape)})")


def check_run_dir(cfg: Config) -> None:
    """A run dir that already holds checkpoints must belong to the same model."""
    t = cfg.train
    saved = checkpoint.saved_config(t.run_dir)
    if saved is not None:
        now = json.loads(json.dumps(dataclasses.asdict(cfg.model)))
        diff = [k for k in now if saved.get("model", {}).get(k) != now[k]]
        if diff:
            raise ConfigError(f"train.run_dir {t.run_dir} holds a run with a different model (model.{diff[0]}: "
                              f"{saved['model'].get(diff[0])!r} there, {now[diff[0]]!r} now); choose a new run_dir")


def to_global(batch: dict, sharding, global_batch: int) -> dict:
    """This process's rows (b, T+1) -> global arrays (B, T+1) sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]),
                                                      (global_batch,) + batch[k].shape[1:]) for k in BATCH_KEYS}


# ----------------------------------------------------------------------------------------------------------------
# The loop.


class _StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint after the current step and exit."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def evaluate(cfg: Config, eval_fn, state: TrainState, batch_sharding) -> float:
    """Mean next-token loss (nats) over `eval_batches` batches of a fresh eval iterator (0: the whole split)."""
    from dsv3_jax import data

    it = data.make_dataset(cfg.data, "eval", cfg.train.global_batch_size, jax.process_index(), jax.process_count(),
                           seed=cfg.train.seed, vocab_size=cfg.model.vocab_size)
    total, count = 0.0, 0.0
    for i, batch in enumerate(it):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        s, c = eval_fn(state.params, state.bias, to_global(batch, batch_sharding, cfg.train.global_batch_size))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def generate_sample(cfg: Config, graphdef, state: TrainState) -> str:
    """A short continuation of `train.sample_prompt` from the trained model, with the `sample` settings."""
    from dsv3_jax.data import make_tokenizer
    from dsv3_jax.sampling import generate

    tok = make_tokenizer(cfg.data.tokenizer)
    prompt = [tok.bos_id] + list(tok.encode(cfg.train.sample_prompt))
    model = nnx.merge(graphdef, state.params, state.bias)
    s = cfg.sample
    out = generate(model, [prompt], cfg.train.sample_tokens, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, seed=s.seed, stop_tokens=[tok.eos_id]).tokens[0]
    return cfg.train.sample_prompt + tok.decode([t for t in out if t != tok.eos_id])


def train(cfg: Config) -> dict:
    """Train `cfg` (resuming from the newest checkpoint in train.run_dir); returns the final metrics. The sharding
    rules (defaults with `mesh.rules` overrides) are current for the whole run."""
    with use_rules(rules_for(cfg.mesh)):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    from dsv3_jax import data

    tcfg, b = cfg.train, cfg.train.global_batch_size
    lead = jax.process_index() == 0
    # Everything that can reject the input runs before the run dir is touched.
    mesh = make_mesh(cfg.mesh)
    check_run(cfg, mesh)
    train_it = data.make_dataset(cfg.data, "train", b, jax.process_index(), jax.process_count(), seed=tcfg.seed,
                                 vocab_size=cfg.model.vocab_size)
    bytes_per_token = data.split_info(cfg.data, "eval").bytes_per_token if tcfg.eval_every else math.nan
    check_run_dir(cfg)

    # A resume restores straight into the sharded abstract state: nothing is initialised first.
    abstract, graphdef, tx = sharded_abstract_state(cfg, mesh)
    run_dir = pathlib.Path(tcfg.run_dir)
    ckpt = checkpoint.Checkpointer(run_dir, tcfg.checkpoint_every, tcfg.keep_checkpoints, tcfg.async_checkpoint)
    restored = ckpt.restore_latest(abstract._asdict())
    if restored is not None:
        start, saved, data_state = restored
        state = TrainState(**saved)
        train_it.set_state(data_state)
        if lead:
            print(f"resumed from {ckpt.dir / str(start)}", file=sys.stderr)
    else:
        state, _, _ = init_state(cfg, mesh)
    batch_sharding = NamedSharding(mesh, logical_spec(("batch",)))
    step_fn = jit_train_step(cfg, graphdef, tx, mesh, abstract, donate=jax.default_backend() != "cpu")
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef))
    start = int(state.step)
    writer = metrics.Writer(run_dir, tcfg.tensorboard)
    writer.truncate_after(start)
    if lead:
        (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    tokens_per_step = b * cfg.data.seq_len
    flops_per_step = metrics.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak, peak_source = metrics.peak_flops(tcfg.peak_tflops, mesh.devices.reshape(-1))
    if lead:
        print(f"model {cfg.model.hidden_size}d x {cfg.model.num_hidden_layers} layers, {len(jax.devices())} devices "
              f"{dict(mesh.shape)}, {tokens_per_step} tokens/step, peak {peak / 1e12:.3g} TFLOP/s ({peak_source})",
              file=sys.stderr)
    progress = metrics.Progress(tcfg.steps, tcfg.progress)
    last: dict = {}
    t_begin = time.perf_counter()
    # Metrics come to the host only every log_every steps, so the host dispatches steps ahead of the device. The
    # rate clock starts once the first (compiling) step has finished.
    t_window, window_steps, overall = t_begin, 0, [0, 0.0]
    with jax.set_mesh(mesh), _StopSignal() as stop:
        for step in range(start + 1, tcfg.steps + 1):
            batch = to_global(next(train_it), batch_sharding, b)
            state, m = step_fn(state, batch)
            if step == start + 1:
                jax.block_until_ready(m)
                t_window = time.perf_counter()
            else:
                window_steps += 1
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                values = metrics.scalars(jax.device_get(m))  # waits for this step: the one sync per window
                now = time.perf_counter()
                rate = window_steps * tokens_per_step / (now - t_window) if window_steps else math.nan
                overall = [overall[0] + window_steps, overall[1] + now - t_window]
                t_window, window_steps = now, 0
                mean_step_s = overall[1] / overall[0] if overall[0] else math.nan
                values["tokens_per_s"] = rate
                values["mfu"] = rate * flops_per_step / tokens_per_step / peak
                values["elapsed_s"] = now - t_begin
                writer.write(step, "train", values)
                progress.clear()
                if lead:
                    print(f"step {step}/{tcfg.steps} | loss {values['loss']:.4f} | mtp {values['mtp_loss']:.4f} | "
                          f"bal {values['balance_loss']:.2e} | gnorm {values['grad_norm']:.3f} | lr {values['lr']:.2e}"
                          f" | {rate:,.0f} tok/s | mfu {100 * values['mfu']:.2f}% | maxvio "
                          f"{values['maxvio_mean']:.3f} | dead {int(values['dead_experts'])} | ETA "
                          f"{metrics.format_duration((tcfg.steps - step) * mean_step_s)}", flush=True)
                progress.update(step, values["loss"], values["mtp_loss"], tokens_per_step / mean_step_s,
                                (tcfg.steps - step) * mean_step_s)
                last = values
            if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                loss = evaluate(cfg, eval_fn, state, batch_sharding)
                ev = {"loss": loss, "bits_per_byte": loss / math.log(2) / bytes_per_token}
                writer.write(step, "eval", ev)
                last = {**last, **{f"eval_{k}": v for k, v in ev.items()}}
                progress.clear()
                if lead:
                    print(f"eval step {step} | loss {loss:.4f} | bits/byte {ev['bits_per_byte']:.4f}", flush=True)
            ckpt.save(step, state._asdict(), train_it.get_state(), cfg,
                      force=step == tcfg.steps or stop.signum is not None)
            if stop.signum is not None:
                ckpt.close()
                progress.clear()
                print(f"stopped by signal {stop.signum} after step {step}; checkpoint saved in {ckpt.dir}",
                      file=sys.stderr)
                raise SystemExit(128 + stop.signum)
    ckpt.close()
    progress.clear()
    if tcfg.sample_tokens and jax.process_count() == 1 and lead:
        with jax.set_mesh(mesh):
            text = generate_sample(cfg, graphdef, state)
        writer.text(int(state.step), "sample", text)
        print(f"--- sample ---\n{text}\n--------------", flush=True)
    writer.close()
    return last
