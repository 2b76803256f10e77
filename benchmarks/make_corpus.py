"""Write a synthetic JSONL corpus of about --mb megabytes (for the data pipeline's memory and speed benchmarks).

Each record is {"text": ...}: a document of 50-2000 pseudo-words drawn from a Zipf-distributed vocabulary, so the
text compresses and tokenises like prose rather than noise. Deterministic for a given --seed.
`python benchmarks/make_corpus.py --mb 1000 --out /tmp/corpus1g --files 8`
"""

import argparse
import json
import pathlib

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--files", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = ["".join(rng.choice(letters, int(n))) for n in rng.integers(1, 11, 20000)]
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_file = a.mb * 2**20 / a.files
    for f in range(a.files):
        size = 0
        with open(out / f"part{f:03d}.jsonl", "w") as fh:
            while size < per_file:
                words = rng.zipf(1.2, int(rng.integers(50, 2000))) % len(vocab)
                line = json.dumps({"text": " ".join(vocab[w] for w in words) + "."}) + "\n"
                fh.write(line)
                size += len(line)
    print(f"{a.out}: {a.files} files, {a.mb:.0f} MB")


if __name__ == "__main__":
    main()
