"""The training loop: checks of the run against the mesh, resume, the data iterators, the jitted step, evaluation,
metrics, checkpoints, a clean stop on SIGINT/SIGTERM, and a sample at the end.
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
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dsv3_jax.config import Config
from dsv3_jax.data import atomic, pipeline
from dsv3_jax.data.tokenizer import make_tokenizer
from dsv3_jax.errors import ConfigError, interrupted
from dsv3_jax.infer.sampling import generate
from dsv3_jax.parallel.sharding import (
    logical_size,
    logical_spec,
    make_mesh,
    mesh_axes,
    rules_for,
    use_rules,
)
from dsv3_jax.train import checkpoint, metrics
from dsv3_jax.train.evaluate import bits_per_byte, split_sums
from dsv3_jax.train.state import (
    TrainState,
    abstract_state,
    init_state,
)
from dsv3_jax.train.step import eval_step, jit_train_step, to_global


def check_run(cfg: Config, mesh) -> None:
    """Shape checks across config sections and the mesh, with one-line errors naming the fields."""
    t, b = cfg.train, cfg.train.global_batch_size
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_position_embeddings "
                          f"({cfg.model.max_position_embeddings})")
    dp = logical_size(mesh, "batch")
    if b % dp:
        raise ConfigError(f"train.global_batch_size ({b}) is not divisible by the data-parallel size {dp} "
                          f"(mesh {'*'.join(mesh_axes('batch'))} = {dict(mesh.shape)})")
    if (b // t.micro_batches) % dp:
        raise ConfigError(f"the micro-batch size ({b} / train.micro_batches {t.micro_batches}) is not divisible "
                          f"by the data-parallel size {dp}")
    if b % jax.process_count():
        raise ConfigError(f"train.global_batch_size ({b}) is not divisible by the {jax.process_count()} processes")
    ep = logical_size(mesh, "experts")
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


def mesh_of(cfg: Config):
    """The run's mesh; on CPU, a mesh larger than the devices there are names the flag that fakes more."""
    try:
        return make_mesh(cfg.mesh)
    except ConfigError as e:
        if jax.default_backend() != "cpu" or "device" not in str(e):
            raise
        raise ConfigError(f"{e} (this CPU process has {jax.device_count()} devices; "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N)") from None


class _StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint after the current step and exit. A Ctrl-C that came
    before the loop and was swallowed on its way up (errors.interrupted) stops the run before its first step."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if interrupted():
            raise KeyboardInterrupt
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
    sums = split_sums(lambda b: eval_fn(state.params, state.bias, to_global(b, batch_sharding,
                                                                            cfg.train.global_batch_size)),
                      cfg.data, cfg.train.global_batch_size, cfg.train.eval_batches, cfg.train.seed,
                      cfg.model.vocab_size, jax.process_index(), jax.process_count())
    total, count = (0.0, 0.0) if sums is None else sums
    return float(total) / max(float(count), 1.0)


def generate_sample(cfg: Config, graphdef, state: TrainState) -> str:
    """A short continuation of `train.sample_prompt` from the trained model, with the `sample` settings."""
    tok = make_tokenizer(cfg.data.tokenizer)
    prompt = [tok.bos_id] + list(tok.encode(cfg.train.sample_prompt))
    model = nnx.merge(graphdef, state.params, state.bias)
    s = cfg.sample
    out = generate(model, [prompt], cfg.train.sample_tokens, temperature=s.temperature, top_k=s.top_k,
                   top_p=s.top_p, seed=s.seed, stop_tokens=[tok.eos_id]).tokens[0]
    return cfg.train.sample_prompt + tok.decode([t for t in out if t != tok.eos_id])


def init_from(cfg: Config, abstract: TrainState, tx, mesh, lead: bool) -> TrainState:
    """Step 0 of a new stage: the params and router bias of `train.init_from` as saved (shapes checked: a mismatch is
    one error line), a fresh optimizer state; one line per model field (and data.seq_len) that differs from the source
    run."""
    params, bias, src = checkpoint.read_params(cfg.train.init_from, abstract.params, abstract.bias)
    if lead:
        changes = checkpoint.config_changes(src, cfg) or ["no model field changed"]
        for line in changes:
            print(f"init_from {cfg.train.init_from}: {line}", file=sys.stderr)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda x: x.sharding, abstract.opt_state))(params)
    step = jax.device_put(np.zeros((), np.int32), abstract.step.sharding)
    return TrainState(step, params, bias, opt_state)


def train(cfg: Config) -> dict:
    """Train `cfg` (resuming from the newest checkpoint in train.run_dir); returns the final metrics. The sharding
    rules (defaults with `mesh.rules` overrides) are current for the whole run."""
    with use_rules(rules_for(cfg.mesh)):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    tcfg, b = cfg.train, cfg.train.global_batch_size
    lead = jax.process_index() == 0
    # Everything that can reject the input runs before the run dir is touched.
    mesh = mesh_of(cfg)
    check_run(cfg, mesh)
    train_it = pipeline.make_dataset(cfg.data, "train", b, jax.process_index(), jax.process_count(), seed=tcfg.seed,
                                     vocab_size=cfg.model.vocab_size)
    bytes_per_token = pipeline.split_info(cfg.data, "eval").bytes_per_token if tcfg.eval_every else math.nan
    check_run_dir(cfg)

    # A resume restores straight into the sharded abstract state: nothing is initialised first.
    abstract, graphdef, tx = abstract_state(cfg, mesh)
    run_dir = pathlib.Path(tcfg.run_dir)
    seeded = None
    if tcfg.init_from and not checkpoint.existing_steps(run_dir):
        seeded = init_from(cfg, abstract, tx, mesh, lead)
    ckpt = checkpoint.Checkpointer(run_dir, tcfg.checkpoint_every, tcfg.keep_checkpoints, tcfg.async_checkpoint)
    restored = ckpt.restore_latest(abstract._asdict())
    if restored is not None:
        start, saved, data_state = restored
        state = TrainState(**saved)
        train_it.set_state(data_state)
        if lead:
            print(f"resumed from {ckpt.dir / str(start)}", file=sys.stderr)
    elif seeded is not None:
        state = seeded
    else:
        state, _, _ = init_state(cfg, mesh)
    batch_sharding = NamedSharding(mesh, logical_spec(("batch",)))
    step_fn = jit_train_step(cfg, graphdef, tx, mesh, abstract, donate=jax.default_backend() != "cpu")
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef))
    start = int(state.step)
    writer = metrics.Writer(run_dir, tcfg.tensorboard)
    writer.truncate_after(start)
    if lead:
        atomic.write_text(run_dir / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    tokens_per_step = b * cfg.data.seq_len
    flops_per_step = metrics.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    # beside the data cache: ~/.cache/dsv3_jax/ by default
    peak, peak_source = metrics.peak_flops(tcfg.peak_tflops, mesh.devices.reshape(-1),
                                           pathlib.Path(cfg.data.cache_dir).expanduser().parent)
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
                ev = {"loss": loss, "bits_per_byte": bits_per_byte(loss, bytes_per_token)}
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
