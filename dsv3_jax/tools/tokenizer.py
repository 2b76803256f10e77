"""Train a byte-level BPE tokenizer.json on a corpus.

    python -m dsv3_jax.tools.tokenizer train --source GLOB --vocab-size N --out tokenizer.json
"""

from __future__ import annotations

from dsv3_jax.data.tokenizer import train_bpe
from dsv3_jax.errors import DataError


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dsv3_jax.tools.tokenizer train",
                                     description="Train a byte-level BPE tokenizer.json on a corpus.")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--source", required=True, help="'stdlib' or a glob of text/jsonl/parquet/arrayrecord files")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="the tokenizer.json to write")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-documents", type=int, default=None)
    a = parser.parse_args(argv)
    try:
        tok = train_bpe(a.source, a.vocab_size, a.out, a.format, a.text_field, a.max_documents)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: byte-level BPE, vocab_size {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id} "
          f"(use data.tokenizer={a.out} and model.vocab_size>={tok.vocab_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
