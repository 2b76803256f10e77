"""Generate from a checkpoint: ours (a run dir or step dir, `checkpoint.load_model`) or an HF-format directory
(config.json + safetensors, `hf.load`), with the byte tokenizer or the directory's tokenizer.json.

  python sample.py --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 64
  python sample.py --checkpoint path/to/hf_dir --prompt-ids 0,72,105 --speculative mtp --json
  python sample.py --checkpoint DeepSeek-V3 --mesh expert=8 --dtype bfloat16 --prompt "Hello"

--mesh (data, fsdp, expert, tensor sizes as in training's `mesh` config; -1 takes the remaining devices, data is
-1 unless given) decodes sharded: rows and their caches over the batch axes, routed experts over `expert`, heads
and FFN widths over `tensor` (infer/sampling.py DECODE_RULES); an HF directory is loaded straight onto the mesh,
each process reading its own slices. FP8 weights of an HF directory stay E4M3 with their block scales (`--fp8
dequantise` loads them as --dtype instead).

Text prompts start with the tokenizer's bos id (as in training); --prompt-ids are used verbatim. Several --prompt /
--prompt-ids flags make one batch. A single prompt streams its text as it is generated; a batch prints each
completion at the end. Bad input prints `error: <one line>` and exits with status 2; Ctrl-C prints one line and
exits with status 130. A run dir whose newest checkpoint fails to restore is sampled from the one before it (the
broken one is set aside, with one warning line). Prompt plus --max-new-tokens must fit the model's context
(max_position_embeddings).
"""

from __future__ import annotations

import json
import pathlib
import sys

from dsv3_jax.errors import ArgumentParser, UsageError, one_line, run_command


def parse_args(argv):
    p = ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="our run/step dir, or an HF dir with config.json")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-ids", default=None, help="comma-separated stop ids; default the eos id; '' for none")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json path (default: the checkpoint's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (HF dirs)")
    p.add_argument("--no-bos", action="store_true", help="do not start text prompts with the bos id")
    p.add_argument("--chunk-size", type=int, default=16, help="decode steps per compiled call while streaming")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timing, acceptance)")
    p.add_argument("--mesh", default=None, help="decode sharded on a mesh, e.g. expert=8 or expert=4,tensor=2")
    p.add_argument("--fp8", choices=["keep", "dequantise"], default="keep",
                   help="FP8 weights of an HF dir: kept E4M3 (default) or dequantised to --dtype")
    return p.parse_args(argv)


def parse_ids(text: str, what: str) -> list[int]:
    parts = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return [int(s) for s in parts]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_mesh(text: str):
    """`expert=8,tensor=2` -> the MeshConfig training would build from the same sizes (data -1 unless given)."""
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.parallel.sharding import MESH_AXES

    sizes = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in MESH_AXES:
            raise UsageError(f"--mesh takes axis=size pairs over {', '.join(MESH_AXES)}, got {part!r}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--mesh {name.strip()} must be an integer, got {value!r}") from None
    if not sizes:
        raise UsageError("--mesh needs at least one axis=size pair")
    return MeshConfig(**sizes)


def load(path_str: str, dtype: str, tokenizer_spec: str | None, mesh=None, keep_fp8: bool = True):
    """(model, tokenizer, SampleConfig defaults) from either checkpoint format; on `mesh` when given (placed by the
    decode rules)."""
    from dsv3_jax.config import SampleConfig
    from dsv3_jax.data.tokenizer import make_tokenizer
    from dsv3_jax.infer import sampling
    from dsv3_jax.interop import hf
    from dsv3_jax.train import checkpoint

    path = pathlib.Path(path_str)
    if not path.is_dir():
        raise UsageError(f"checkpoint {path} {'is not a directory' if path.exists() else 'does not exist'}")
    try:
        ours = (path / "checkpoints").is_dir() or (path / "state").is_dir()  # a run dir or one of its step dirs
        if (path / "config.json").is_file() and not ours:
            model, spec, defaults = hf.load(path, dtype=dtype, mesh=mesh, keep_fp8=keep_fp8,
                                            rules=sampling.DECODE_RULES), "byte", SampleConfig()
            if (path / "tokenizer.json").is_file():
                spec = str(path / "tokenizer.json")
        else:
            model, cfg = checkpoint.load_model(path)
            spec, defaults = cfg.data.tokenizer, cfg.sample
            if mesh is not None:
                model = _placed(model, mesh, sampling.DECODE_RULES)
    except Exception as e:  # noqa: BLE001  (any failure to read the directory is a bad checkpoint, one line)
        from dsv3_jax.errors import Error

        reason = one_line(e) if isinstance(e, (Error, OSError)) else f"{type(e).__name__}: {one_line(e)[:300]}"
        raise UsageError(f"cannot load checkpoint {path}: {reason}") from None
    return model, make_tokenizer(tokenizer_spec or spec), defaults


def _placed(model, mesh, rules):
    """`model` with its parameters moved onto `mesh` in the shardings `rules` give them."""
    import jax
    from flax import nnx

    from dsv3_jax.parallel.sharding import state_shardings

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


class Streamer:
    """Prints one row's text as tokens arrive, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, new: list[list[int]], final: bool = False) -> None:
        self.ids += new[0]
        text = self.tokenizer.decode(self.ids)
        text = text if final else text.rstrip("\ufffd")
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def run(args) -> int:
    prompts = [("text", t) for t in args.prompt] + [("ids", parse_ids(s, "--prompt-ids")) for s in args.prompt_ids]
    if not prompts:
        raise UsageError("give at least one --prompt or --prompt-ids")
    for i, (_, p) in enumerate(prompts):
        if len(p) == 0:
            raise UsageError(f"prompt {i} is empty")

    from dsv3_jax.infer import sampling
    from dsv3_jax.parallel.sharding import make_mesh

    mesh = None if args.mesh is None else make_mesh(parse_mesh(args.mesh))
    model, tok, defaults = load(args.checkpoint, args.dtype, args.tokenizer, mesh, args.fp8 == "keep")
    bos = [] if args.no_bos else [tok.bos_id]
    ids = [bos + tok.encode(p) if kind == "text" else p for kind, p in prompts]

    def pick(value, default):
        return default if value is None else value

    settings = {
        "max_new_tokens": pick(args.max_new_tokens, defaults.max_new_tokens),
        "temperature": pick(args.temperature, defaults.temperature),
        "top_k": pick(args.top_k, defaults.top_k),
        "top_p": pick(args.top_p, defaults.top_p),
        "seed": pick(args.seed, defaults.seed),
        "stop_tokens": [tok.eos_id] if args.stop_ids is None else parse_ids(args.stop_ids, "--stop-ids"),
        "speculative": args.speculative,
        "chunk_size": args.chunk_size,
    }
    cfg = model.cfg
    rule = sampling.SamplingRule(settings["temperature"], settings["top_k"], settings["top_p"])
    sampling.check_request(cfg, ids, settings["max_new_tokens"], rule, settings["stop_tokens"], args.speculative,
                           args.chunk_size)
    use_mtp = args.speculative == "mtp"
    cache_bytes = sampling.cache_bytes_per_token(cfg, model.impl.dtype, mtp=use_mtp)
    cache_note = (f"({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers"
                  f"{' + MTP' if use_mtp else ''} x {model.impl.dtype}")
    streamer = Streamer(tok) if len(ids) == 1 and not args.json else None
    if not args.json:
        print(f"cache: {cache_bytes} bytes/token {cache_note}", file=sys.stderr)
        if streamer:
            print(tok.decode(ids[0]), end="", flush=True)
    result = sampling.generate(model, ids, on_tokens=streamer, mesh=mesh, **settings)
    texts = [tok.decode(t) for t in result.tokens]
    if args.json:
        rows = [{"prompt_ids": p, "tokens": t, "text": s, "finish_reason": f}
                for p, t, s, f in zip(ids, result.tokens, texts, result.finish_reasons)]
        print(json.dumps({"results": rows, "cache_bytes_per_token": cache_bytes, "cache": cache_note,
                          "timing": result.timing, "acceptance": result.acceptance, "drafts": result.drafts,
                          "accepted": result.accepted,
                          "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()}}))
        return 0
    if streamer:
        streamer([[]], final=True)
        print()
    else:
        for i, (p, text) in enumerate(zip(ids, texts)):
            print(f"--- [{i}] {tok.decode(p)}{text}")
    t = result.timing
    spec = "" if result.acceptance is None else f", acceptance {result.accepted}/{result.drafts} drafts"
    print(f"{t['new_tokens']} tokens in {t['prefill_s'] + t['decode_s']:.2f} s ({t['tokens_per_s']:.1f} tok/s, "
          f"decode {t['decode_tokens_per_s']:.1f} tok/s; compile {t['compile_s']:.1f} s){spec}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    def body():
        from dsv3_jax.hostmem import reuse_freed_memory

        reuse_freed_memory()  # before JAX starts its CPU client
        return run(parse_args(sys.argv[1:] if argv is None else argv))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
