"""Decode speed side by side with transformers on the same weights, in one run on the current machine.

  python -m dsv3_jax.tools.bench_decode [--quick] [--json] [--checkpoint runs/small] [--new-tokens 128]
      [--batches 1,16] [--spec-batches 1,16,64] [--attention-block-size 512]

Rows (`run`): greedy decode tokens/s at batch 1 and 16 (16-token prompts, 128 new tokens, no stop token) for
`sampling.generate` and for transformers' `DeepseekV3ForCausalLM.generate` loaded from our `hf.save` of the same
model; both caches' bytes per token (ours: the latent cache, kv_lora + rope dims per layer; transformers: its
DynamicCache, measured: transformers 5 caches the same latent and expands K and V from it at every step); MTP
speculative against plain greedy decoding on a trained checkpoint (the default run's, `runs/small`, when it
exists) at each of `--spec-batches`, on prompts of 16 tokens from the checkpoint's held-out text, with the
acceptance rate and how many rows decode the same tokens both ways; and the batch-1 bytes bound of speculation
(`spec_bytes_bound`). Each figure is the median of several timed calls after one warm-up call (compiles
excluded), the two sides of a row called alternately; both sides time the whole generate call, prefill included.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import tempfile

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ArgumentParser, require, run_command
from dsv3_jax.tools.timing import paired_medians_s, row

# numpy, jax and the model load inside the functions that use them: `python -m dsv3_jax.tools.bench_decode` imports
# this module before `main` installs the error path, and an import interrupted by Ctrl-C would be a traceback (or,
# inside jax's gc callback, swallowed)

PROMPT_LEN = 16


def bench_config() -> ModelConfig:
    """Issue 12's benchmark model (`configs/bench.yaml`), the one `dsv3_jax.bench` trains."""
    from dsv3_jax.presets import load_config

    return load_config("bench").model


def prompts_for(cfg: ModelConfig, batch: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(2, min(cfg.vocab_size, 256), (batch, PROMPT_LEN)).tolist()


def ours_call(model, prompts, new: int, out: dict, speculative: str | None = None):
    """A call of `sampling.generate` (greedy) that leaves its result in out["r"]."""
    from dsv3_jax.infer import sampling

    def call():
        out["r"] = sampling.generate(model, prompts, new, speculative=speculative)

    return call


def hf_call(hf_model, prompts, new: int, out: dict):
    """A call of transformers' greedy generate (exactly `new` tokens per row) on the model's device; its new tokens
    in out["y"] (the copy to the host ends the timed call, so a GPU's queue is drained)."""
    import torch

    ids = torch.tensor(prompts, device=hf_model.device)

    def call():
        with torch.no_grad():
            y = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
        out["y"] = y[:, ids.shape[1]:].tolist()

    return call


def hf_cache_bytes_per_token(hf_model, prompt: list[int]) -> int:
    """Bytes per token of the DynamicCache transformers fills for one prompt (every layer's keys and values)."""
    import torch

    with torch.no_grad():
        cache = hf_model(torch.tensor([prompt], device=hf_model.device), use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total // len(prompt)


def load_hf(model, directory: str, device: str = "cpu"):
    """Our model through `hf.save`, loaded by transformers (float32, eager attention) onto torch `device`."""
    from transformers import DeepseekV3ForCausalLM

    from dsv3_jax.interop import hf

    hf.save(model, directory)
    return DeepseekV3ForCausalLM.from_pretrained(directory, attn_implementation="eager").to(device).eval()


def text_prompts(run_cfg, batch: int) -> list[list[int]]:
    """`batch` prompts of PROMPT_LEN tokens: the starts of the checkpoint's held-out rows (its data config's eval
    split) that hold no padding there, cycled when there are fewer."""
    import numpy as np

    from dsv3_jax.data.pipeline import make_dataset

    rows = []
    for chunk in make_dataset(run_cfg.data, "eval", 64):
        ok = (chunk["segment_ids"][:, :PROMPT_LEN] != 0).all(axis=1)
        rows += np.asarray(chunk["tokens"][ok, :PROMPT_LEN]).tolist()
        if len(rows) >= batch:
            break
    rows = rows or [[0] * PROMPT_LEN]
    return [rows[i % len(rows)] for i in range(batch)]


def speculative_rows(model, prompts: list[list[int]], new: int, repeats: int, source: str) -> list[dict]:
    """MTP speculative against plain greedy decoding of the same prompts: tokens/s of each (new tokens over the
    median seconds of the whole call), the acceptance, how many rows decode the same tokens both ways, and the
    cost of a speculative step (verify + draft) in plain steps: median seconds per main-model forward of the
    speculative call over the plain call's (whole calls, so both include their prefill)."""
    plain, spec = {}, {}
    s_plain, s_spec = paired_medians_s(ours_call(model, prompts, new, plain),
                                       ours_call(model, prompts, new, spec, speculative="mtp"), repeats, warmup=1)
    r = spec["r"]
    same = sum(a == b for a, b in zip(r.tokens, plain["r"].tokens))
    n_spec, n_plain = sum(map(len, r.tokens)), sum(map(len, plain["r"].tokens))
    f_spec, f_plain = r.timing["decode_forwards"] + 1, plain["r"].timing["decode_forwards"] + 1  # + the prefill
    return [row(f"speculative mtp vs plain decode, batch {len(prompts)}, {new} new tokens ({source})", n_spec / s_spec,
                n_plain / s_plain, "tokens/s", acceptance=r.acceptance, drafts=r.drafts, accepted=r.accepted,
                rows_identical=f"{same}/{len(prompts)}", forwards=(f_spec, f_plain),
                step_cost=(s_spec / f_spec) / (s_plain / f_plain))]


def spec_bytes_bound(model, acceptance: float) -> dict:
    """Why speculation can or cannot pay at batch 1, in weight bytes (a batch-1 step is bound by reading weights):
    a plain step reads every main-model weight but the embedding (a row gather), with K of the E routed experts per
    MoE layer; a verify step reads the same for two tokens whose experts are taken as distinct (min(2K, E) per
    layer), plus the MTP draft: its block with K routed experts (the MoE runs on one token), `eh_proj`, its norms
    and the head. The ceiling on the speed-up is (1 + acceptance) x plain bytes / (verify + draft bytes)."""
    from flax import nnx

    cfg, parts = model.cfg, {"main": 0, "experts": 0, "mtp": 0, "mtp_experts": 0, "head": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys, a = [str(k) for k in path], var.get_value()
        routed = keys[-1] in ("w_gate", "w_up", "w_down")
        if keys[0] == "head":
            parts["head"] += a.size * a.dtype.itemsize
        elif keys[0] == "mtp":
            parts["mtp_experts" if routed else "mtp"] += a.size * a.dtype.itemsize
        elif keys[0] != "embed":
            parts["experts" if routed else "main"] += a.size * a.dtype.itemsize
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = parts["experts"] / (moe_layers * e)  # one expert's three matrices
    plain = parts["main"] + parts["head"] + moe_layers * k * per_expert
    verify = parts["main"] + parts["head"] + moe_layers * min(2 * k, e) * per_expert
    draft = parts["mtp"] + parts["head"] + k * parts["mtp_experts"] / e
    return row("speculative mtp, batch 1: ceiling = (1 + acceptance) x plain step bytes / (verify + draft bytes)",
               (1 + acceptance) * plain / (verify + draft), None, "x", plain_mb=plain / 1e6, verify_mb=verify / 1e6,
               draft_mb=draft / 1e6, acceptance=acceptance)


def run(quick: bool, *, cfg: ModelConfig | None = None, checkpoint: str | None = "runs/small", new_tokens: int = 128,
        batches: tuple[int, ...] = (1, 16), torch_threads: int | None = None,
        attention_block_size: int | None = None, hf_device: str = "cpu",
        spec_batches: tuple[int, ...] = (1, 16, 64)) -> list[dict]:
    """The decode rows (see the module docstring). `cfg` replaces the bench config (tests); the speculative rows
    (one per `spec_batches`, and the bytes bound after batch 1) use `checkpoint` when it exists, else the bench
    model itself (random prompts) when it has an MTP module, else are left out.
    `torch_threads` sets transformers' intra-op threads (on a CPU shared with other jobs torch's default
    threading collapses: one thread decoded 10x faster on the loaded 2-core machine). `attention_block_size`
    sets our model's impl field (decode reads caches longer than it in blocks, up to the filled part).
    `hf_device`: torch's device for transformers ("cuda" on a GPU machine, where JAX decodes too)."""
    from dsv3_jax.config import ImplConfig
    from dsv3_jax.model.transformer import create

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    cfg = cfg or bench_config()
    repeats = 2 if quick else 5
    impl = ImplConfig() if attention_block_size is None else ImplConfig(attention_block_size=attention_block_size)
    model = create(cfg, seed=0, impl=impl.validate())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = load_hf(model, tmp, hf_device)
        for b in batches:
            prompts = prompts_for(cfg, b)
            ours, ref = {}, {}
            s_ours, s_ref = paired_medians_s(ours_call(model, prompts, new_tokens, ours),
                                             hf_call(hf_model, prompts, new_tokens, ref), repeats, warmup=1)
            same = sum(a == r for a, r in zip(ours["r"].tokens, ref["y"]))
            n_ours = sum(map(len, ours["r"].tokens))
            rows.append(row(f"greedy decode, batch {b}, {new_tokens} new tokens", n_ours / s_ours,
                            b * new_tokens / s_ref, "tokens/s", rows_identical=f"{same}/{b}"))
        from dsv3_jax.infer.sampling import cache_bytes_per_token

        ours_bytes = cache_bytes_per_token(cfg, model.impl.dtype)
        rows.append(row("cache bytes per token", ours_bytes, hf_cache_bytes_per_token(hf_model, prompts_for(cfg, 1)[0]),
                        "bytes"))
    if checkpoint and pathlib.Path(checkpoint).is_dir():
        from dsv3_jax.train import checkpoint as ckpt

        spec_model, run_cfg = ckpt.load_model(checkpoint)
        source, prompts = f"checkpoint {checkpoint}", functools.partial(text_prompts, run_cfg)
    elif cfg.num_nextn_predict_layers:
        spec_model, source, prompts = model, "untrained bench model", functools.partial(prompts_for, cfg)
    else:
        return rows
    for b in spec_batches:
        rows += speculative_rows(spec_model, prompts(b), new_tokens, repeats, source)
        if b == 1:
            rows.append(spec_bytes_bound(spec_model, rows[-1]["acceptance"] or 0.0))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| | ours | transformers / plain | ratio | unit |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = "" if r["reference"] is None else f"{r['reference']:,.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        extra = f" (acceptance {r['accepted']}/{r['drafts']})" if "drafts" in r else ""
        if "step_cost" in r:
            extra = (f" (acceptance {r['accepted']}/{r['drafts']}, rows identical {r['rows_identical']}, a step costs "
                     f"{r['step_cost']:.2f} plain steps)")
        if "plain_mb" in r:
            extra = (f" (acceptance {r['acceptance']:.2f}; plain {r['plain_mb']:.2f} MB, verify {r['verify_mb']:.2f} MB"
                     f" + draft {r['draft_mb']:.2f} MB)")
        ours = f"{r['ours']:.2f}" if r["unit"] == "x" else f"{r['ours']:,.0f}"
        lines.append(f"| {r['name']}{extra} | {ours} | {ref} | {ratio} | {r['unit']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command on the one error path (errors.run_command): bad input is one `error:` line and status 2,
    Ctrl-C (also during a compile or a timed call) one line and status 130."""
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.bench_decode", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the median of two timed calls per figure instead of five")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--checkpoint", default="runs/small", help="trained run for the speculative row")
    p.add_argument("--torch-threads", type=int, default=None, help="transformers' intra-op threads (torch default)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row of the greedy rows")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes of the greedy rows")
    p.add_argument("--spec-batches", default="1,16,64",
                   help="comma-separated batch sizes of the speculative rows (empty: none)")
    p.add_argument("--attention-block-size", type=int, default=None,
                   help="our impl.attention_block_size (default 512): caches longer than it are read in blocks")
    args = p.parse_args(argv)
    batches, spec_batches = (_batches(p, name, value) for name, value in
                             (("--batches", args.batches), ("--spec-batches", args.spec_batches)))
    if args.new_tokens <= 0 or any(b <= 0 for b in batches):
        p.error("--new-tokens and --batches must be positive")
    if any(b <= 0 for b in spec_batches):
        p.error(f"--spec-batches must be positive, got {args.spec_batches!r}")
    if args.attention_block_size is not None and args.attention_block_size <= 0:
        p.error(f"--attention-block-size must be positive, got {args.attention_block_size}")
    from dsv3_jax.hostmem import reuse_freed_memory

    reuse_freed_memory()  # before JAX starts its CPU client; both sides see the same allocator
    require("torch", "bench")
    require("transformers", "bench")
    rows = run(args.quick, checkpoint=args.checkpoint, torch_threads=args.torch_threads, new_tokens=args.new_tokens,
               batches=batches, attention_block_size=args.attention_block_size, spec_batches=spec_batches)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


def _batches(p, name: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        p.error(f"{name} must be comma-separated integers, got {value!r}")


if __name__ == "__main__":
    sys.exit(main())
