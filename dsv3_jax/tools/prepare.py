"""Prepare a raw source into token shards that training reads lazily (data/prepare.py).

    python -m dsv3_jax.tools.prepare --source GLOB --tokenizer byte|PATH --out DIR [--processes N]

Bad input (no files, binary files, no text, --out a file or a non-empty directory) prints `error: <one line>` and
exits with status 2, leaving nothing; Ctrl-C prints one line and exits with status 130, keeping the finished shards
(a rerun resumes from them) and no unfinished file.
"""

from __future__ import annotations

import os
import sys
import time

from dsv3_jax.data.sources import FORMATS
from dsv3_jax.errors import ArgumentParser, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m dsv3_jax.tools.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="'stdlib' or a glob of text/jsonl/parquet/arrayrecord files")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--eval-fraction", type=float, default=0.02)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--shard-mb", type=float, default=16)
    a = parser.parse_args(argv)
    from dsv3_jax.data.prepare import SPLITS, prepare

    t0 = time.perf_counter()
    m = prepare(a.source, a.tokenizer, a.out, a.format, a.text_field, a.eval_fraction, a.max_documents,
                a.processes, a.shard_mb, log=lambda s: print(s, file=sys.stderr, flush=True))
    dt = time.perf_counter() - t0
    s = m["splits"]
    docs = sum(s[x]["documents"] for x in SPLITS)
    tokens = sum(s[x]["target_tokens"] + s[x]["documents"] for x in SPLITS)
    mb = sum(s[x]["bytes"] for x in SPLITS) / 2**20
    print(f"{a.out}: {docs} documents ({s['eval']['documents']} eval), {tokens} tokens, {mb:.1f} MB of text, "
          f"{len(m['shards'])} shards in {dt:.1f}s ({mb / dt:.2f} MB/s, {tokens / dt:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
