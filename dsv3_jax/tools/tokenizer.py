"""Train a byte-level BPE tokenizer.json on a corpus.

    python -m dsv3_jax.tools.tokenizer train --source GLOB --vocab-size N --out tokenizer.json

Bad input (no files, binary files, no text, a vocabulary the corpus cannot fill, --out a directory) prints
`error: <one line>` and exits with status 2; Ctrl-C prints one line and exits with status 130. The file is written
whole or not at all.
"""

from __future__ import annotations

import sys

from dsv3_jax.errors import ArgumentParser, run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m dsv3_jax.tools.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--source", required=True, help="'stdlib' or a glob of text/jsonl/parquet/arrayrecord files")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="the tokenizer.json to write")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--max-documents", type=int, default=None)
    a = parser.parse_args(argv)
    from dsv3_jax.data.tokenizer import train_bpe

    tok = train_bpe(a.source, a.vocab_size, a.out, a.format, a.text_field, a.max_documents)
    print(f"{a.out}: byte-level BPE, vocab_size {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id} "
          f"(use data.tokenizer={a.out} and model.vocab_size>={tok.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
