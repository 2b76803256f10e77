"""Held-out evaluation of a checkpoint: loss, perplexity, bits per byte, next-token and MTP accuracy, MaxVio_global.

    python -m dsv3_jax.tools.eval --checkpoint runs/small                 # the run's own eval split
    python -m dsv3_jax.tools.eval --checkpoint path/to/hf_dir --data 'held_out/*.txt' --batches 8 --json

MTP accuracy at depth k is how often the argmax of the depth-k head at position t equals token t+k+1, over
positions where that target lies in the same document: with greedy decoding it is the rate at which
`sample.py --speculative mtp` would accept a draft if the main model's own prediction were always right.
Bits per byte divide the loss per predicted token by ln 2 and by the split's UTF-8 bytes per predicted token.

Long context (docs/context_extension.md): `--position-buckets 0,256,1024,2048` adds the loss by in-document position
of the input token (bucket [a, b) holds the predictions made from a+1 .. b tokens of their document), and `--model
model.KEY=VALUE` evaluates the same weights under a changed architecture field that has no parameters (rope scaling,
max_position_embeddings), e.g. a short-context checkpoint at 2K with and without YaRN:

    python -m dsv3_jax.tools.eval --checkpoint runs/short --seq-len 2048 --position-buckets 0,256,1024,2048 \
        --model model.max_position_embeddings=2048 \
        --model 'model.rope_scaling={factor: 8, original_max_position_embeddings: 256}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

from dsv3_jax.errors import ArgumentParser, ConfigError, run_command


def parse_buckets(text: str) -> tuple[int, ...]:
    """`0,256,1024,2048` -> bucket edges (strictly increasing, >= 0, at least two); a one-line error otherwise."""
    try:
        edges = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--position-buckets expects comma-separated integers, got {text!r}") from None
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"--position-buckets needs at least two increasing edges >= 0, got {text!r}")
    return edges


def position_bucket_sums(graphdef, params, bias, batch: dict, edges: tuple[int, ...]) -> dict:
    """Per bucket k, the sum and count of next-token cross-entropies whose INPUT token has in-document position p
    with edges[k] <= p < edges[k+1] (a prediction from p+1 tokens of its document); (K,) each."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.train import losses
    from dsv3_jax.train.step import forward

    logits_btv = forward(graphdef, params, bias, batch, mtp=False).logits
    tokens = batch["tokens"]
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    mask_bt = losses.same_document_mask(batch["segment_ids"], 0)
    pos_bt1 = batch["positions"][:, :-1, None]
    lo, hi = jnp.asarray(edges[:-1]), jnp.asarray(edges[1:])
    in_bucket_btk = ((pos_bt1 >= lo) & (pos_bt1 < hi) & mask_bt[..., None]).astype(jnp.float32)
    return {"ce": jnp.einsum("bt,btk->k", jnp.where(mask_bt, nll_bt, 0.0), in_bucket_btk),
            "count": in_bucket_btk.sum((0, 1))}


def with_model_fields(model, overrides: list[str]):
    """The same weights under a model config with `model.KEY=VALUE` overrides that leave every parameter shape as
    it is (rope scaling, max_position_embeddings: YaRN changes frequencies and the softmax scale, not arrays)."""
    from flax import nnx

    from dsv3_jax.config import Config, apply_overrides
    from dsv3_jax.model.routing import RouterBias
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.train.checkpoint import shape_mismatch

    for o in overrides:
        if not o.startswith("model."):
            raise ConfigError(f"--model takes model.KEY=VALUE overrides, got {o!r}")
    cfg = apply_overrides(Config(model=model.cfg), overrides).model
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    graphdef, new_params, new_bias = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), model.impl)),
                                               nnx.Param, RouterBias)
    bad = shape_mismatch({"params": nnx.to_pure_dict(params), "bias": nnx.to_pure_dict(bias)},
                         {"params": nnx.to_pure_dict(new_params), "bias": nnx.to_pure_dict(new_bias)},
                         f"--model {' '.join(overrides)} changes parameter shapes")
    if bad:
        raise ConfigError(bad)
    return nnx.merge(graphdef, params, bias)


def evaluate_positions(model, data_cfg, batch_size: int, batches: int, edges: tuple[int, ...],
                       seed: int = 0) -> list[dict]:
    """[{lo, hi, loss, tokens}] per position bucket (`position_bucket_sums`) over the eval batches of `data_cfg`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax.model.routing import RouterBias
    from dsv3_jax.train.evaluate import split_sums
    from dsv3_jax.train.step import BATCH_KEYS

    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    step = jax.jit(lambda p, b, x: position_bucket_sums(graphdef, p, b, x, tuple(edges)))
    total = split_sums(lambda batch: step(params, bias, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}), data_cfg,
                       batch_size, batches, seed, model.cfg.vocab_size)
    if total is None:
        raise ConfigError(f"data.source={data_cfg.source!r} has no eval batches of {batch_size} rows")
    return [{"lo": lo, "hi": hi, "loss": float(ce) / float(n) if n else math.nan, "tokens": int(n)}
            for lo, hi, ce, n in zip(edges, edges[1:], total["ce"], total["count"])]


def evaluate_model(model, data_cfg, batch_size: int, batches: int, seed: int = 0,
                   position_buckets: tuple[int, ...] | None = None) -> dict:
    """Loss (nats/token), perplexity, bits per byte and accuracies over `batches` eval batches (0: the whole split)
    of `data_cfg` (a DataConfig); rows longer than the model's context are refused, as training refuses them. With
    `position_buckets` (edges), also `position_buckets`: [{lo, hi, loss, tokens}] (`position_bucket_sums`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsv3_jax.data import pipeline
    from dsv3_jax.model.routing import RouterBias
    from dsv3_jax.train.evaluate import batch_sums, bits_per_byte, split_sums
    from dsv3_jax.train.step import BATCH_KEYS

    limit = model.cfg.max_position_embeddings
    if data_cfg.seq_len > limit:
        raise ConfigError(f"data.seq_len {data_cfg.seq_len} (--seq-len) exceeds the model's context, "
                          f"model.max_position_embeddings={limit}")

    graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
    step = jax.jit(lambda p, b, x: batch_sums(graphdef, p, b, x))
    total = split_sums(lambda batch: step(params, bias, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}), data_cfg,
                       batch_size, batches, seed, model.cfg.vocab_size)
    if total is None:
        raise ConfigError(f"data.source={data_cfg.source!r} has no eval batches of {batch_size} rows")
    bpt = pipeline.split_info(data_cfg, "eval").bytes_per_token
    loss = float(total["ce"]) / max(float(total["count"]), 1.0)
    res = {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bits_per_byte(loss, bpt),
           "accuracy": float(total["correct"]) / max(float(total["count"]), 1.0), "tokens": int(total["count"])}
    # MaxVio_global per MoE layer: the load violation of the counts accumulated over the whole held-out set
    counts = total["expert_counts"]
    for layer, v in enumerate(counts.max(-1) / np.maximum(counts.mean(-1), 1e-9) - 1.0):
        res[f"maxvio_global/{layer}"] = float(v)
    if position_buckets is not None:
        res["position_buckets"] = evaluate_positions(model, data_cfg, batch_size, batches, position_buckets, seed)
    if "mtp_ce" in total:
        for k in range(len(total["mtp_ce"])):
            n = max(float(total["mtp_count"][k]), 1.0)
            res[f"mtp{k + 1}_loss"] = float(total["mtp_ce"][k]) / n
            res[f"mtp{k + 1}_accuracy"] = float(total["mtp_correct"][k]) / n
    return res


def load(path_str: str, data_source: str | None, tokenizer: str | None, seq_len: int | None) -> tuple:
    """(model, Config) from our run/step dir (its own data config) or an HF dir (stdlib or --data, byte tokenizer
    unless the dir has tokenizer.json)."""
    from dsv3_jax.config import Config, DataConfig
    from dsv3_jax.interop import hf
    from dsv3_jax.train import checkpoint

    path = pathlib.Path(path_str)
    if not path.is_dir():
        raise ConfigError(f"--checkpoint {path} {'is not a directory' if path.exists() else 'does not exist'}")
    ours = (path / "checkpoints").is_dir() or (path / "state").is_dir()
    if (path / "config.json").is_file() and not ours:
        model = hf.load(path, dtype="float32")
        tok = str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else "byte"
        cfg = Config(model=model.cfg, data=DataConfig(tokenizer=tok))
    elif ours:
        model, cfg = checkpoint.load_model(path)
    else:
        raise ConfigError(f"--checkpoint {path} is neither a run dir with checkpoints, a checkpoint step dir, nor "
                          "an HF dir with config.json")
    d = cfg.data
    d = dataclasses.replace(d, source=data_source or d.source, tokenizer=tokenizer or d.tokenizer,
                            seq_len=seq_len or d.seq_len)
    return model, dataclasses.replace(cfg, data=d)


def bucket_table(rows: dict[str, list[dict]]) -> str:
    """Markdown: one row per evaluated condition, one loss column per position bucket (tokens in the header)."""
    first = next(iter(rows.values()))
    head = ["", *(f"positions {b['lo']}-{b['hi']} ({b['tokens']:,} tokens)" for b in first)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join([name, *(f"{b['loss']:.4f}" for b in bs)]) + " |" for name, bs in rows.items()]
    return "\n".join(lines)


def format_table(res: dict) -> str:
    rows = [("loss (nats/token)", f"{res['loss']:.4f}"), ("perplexity", f"{res['perplexity']:.3f}"),
            ("bits per byte", f"{res['bits_per_byte']:.4f}"), ("next-token accuracy", f"{res['accuracy']:.4f}")]
    k = 1
    while f"mtp{k}_loss" in res:
        rows += [(f"MTP depth {k} loss", f"{res[f'mtp{k}_loss']:.4f}"),
                 (f"MTP depth {k} accuracy (token t+{k + 1})", f"{res[f'mtp{k}_accuracy']:.4f}")]
        k += 1
    layers = [v for k, v in res.items() if k.startswith("maxvio_global/")]
    if layers:
        rows.append(("MaxVio_global per MoE layer", " ".join(f"{v:.3f}" for v in layers)))
    rows.append(("predicted tokens", str(res["tokens"])))
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)
    if "position_buckets" in res:
        text += "\n\nloss (nats/token) by in-document position of the input token:\n\n"
        text += bucket_table({"held-out loss": res["position_buckets"]})
    return text


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.eval", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="our run/step dir, or an HF dir with config.json")
    p.add_argument("--data", help="data.source of the held-out text (default: the run's; stdlib for an HF dir)")
    p.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the run's / the HF dir's)")
    p.add_argument("--seq-len", type=int, help="row length (default: the run's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="eval batches (0: the whole eval split)")
    p.add_argument("--position-buckets", type=parse_buckets, metavar="EDGES",
                   help="loss by in-document position, e.g. 0,256,1024,2048")
    p.add_argument("--model", action="append", default=[], metavar="model.KEY=VALUE",
                   help="evaluate under a changed parameter-free model field (repeatable), e.g. rope_scaling")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.batches < 0 or args.batch_size <= 0:
        raise ConfigError("--batches must be >= 0 and --batch-size positive")
    if args.seq_len is not None and args.seq_len <= 0:
        raise ConfigError(f"--seq-len must be positive, got {args.seq_len}")
    model, cfg = load(args.checkpoint, args.data, args.tokenizer, args.seq_len)
    if args.model:
        model = with_model_fields(model, args.model)
    res = evaluate_model(model, cfg.data, args.batch_size, args.batches, position_buckets=args.position_buckets)
    print(json.dumps(res) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
