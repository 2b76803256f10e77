"""sample.py: JSON and streamed output from an HF-format dir and from our own checkpoint, batches, speculative
decoding, and one-line errors (exit status 2) for bad prompts, flags and checkpoint directories."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from dsv3_jax.data.tokenizer import ByteTokenizer
from dsv3_jax.infer import sampling
from dsv3_jax.model.transformer import create
from dsv3_jax.presets import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

NEW = "6"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Our tiny model (byte vocabulary, MTP included) written in the HF layout."""
    from dsv3_jax.interop import hf

    path = tmp_path_factory.mktemp("ckpt") / "hf"
    hf.save(create(load_config("tiny").model, seed=0), path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    from dsv3_jax.interop import hf

    return hf.load(hf_dir)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_matches_generate(hf_dir, loaded, capsys):
    code, out, err = run(["--checkpoint", hf_dir, "--prompt", "Hi", "--max-new-tokens", NEW, "--stop-ids", "",
                          "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    (row,) = got["results"]
    assert row["prompt_ids"] == [0, 74, 107]  # bos, then byte + 2
    expected = sampling.generate(loaded, [[0, 74, 107]], int(NEW)).tokens[0]
    assert row["tokens"] == expected and row["text"] == ByteTokenizer().decode(expected)
    assert row["finish_reason"] == "length"
    assert got["cache_bytes_per_token"] == (20 + 6) * 3 * 4 and got["acceptance"] is None
    assert got["timing"]["new_tokens"] == int(NEW) and got["timing"]["tokens_per_s"] > 0


def test_streamed_text(hf_dir, loaded, capsys):
    code, out, err = run(["--checkpoint", hf_dir, "--prompt", "Hi", "--max-new-tokens", NEW, "--stop-ids", "",
                          "--chunk-size", "2"], capsys)
    assert code == 0, err
    tokens = sampling.generate(loaded, [[0, 74, 107]], int(NEW)).tokens[0]
    assert out == "Hi" + ByteTokenizer().decode(tokens) + "\n"
    assert "cache: 312 bytes/token" in err and f"{NEW} tokens in" in err


def test_text_is_printed_as_it_streams(hf_dir, capsys, monkeypatch):
    """At every chunk callback, stdout already holds the prompt and the text of every token emitted so far: the text
    streams, it is not printed at the end. (The spy maps tokens to printable bytes: a random model's bytes are
    mostly incomplete UTF-8, which the streamer rightly holds back.)"""
    seen, printed = [], []
    real = sampling.generate

    def spy(model, prompts, max_new_tokens, on_tokens=None, **kw):
        assert on_tokens is not None, "a single text prompt must stream"

        def record(new):
            new = [[2 + ord("a") + t % 26 for t in row] for row in new]  # printable bytes, so every token shows
            on_tokens(new)
            seen.extend(new[0])
            printed.append((list(seen), capsys.readouterr().out))

        return real(model, prompts, max_new_tokens, on_tokens=record, **kw)

    monkeypatch.setattr(sampling, "generate", spy)
    code, out, err = run(["--checkpoint", hf_dir, "--prompt", "Hi", "--max-new-tokens", NEW, "--stop-ids", "",
                          "--chunk-size", "2"], capsys)
    assert code == 0, err
    assert len(printed) == 1 + -(-(int(NEW) - 1) // 2)  # the prefill's token, then one call per 2-step chunk
    so_far = ""
    for ids, text in printed:
        so_far += text
        assert so_far == "Hi" + ByteTokenizer().decode(ids), (ids, so_far)
    assert so_far + out == "Hi" + ByteTokenizer().decode(seen) + "\n"


def test_speculative_batch_equals_plain(hf_dir, loaded, capsys):
    """Two prompts (text and ids) in one batch with MTP speculative decoding: each row is its plain greedy."""
    code, out, err = run(["--checkpoint", hf_dir, "--prompt", "Hi", "--prompt-ids", "0,72,105",
                          "--max-new-tokens", NEW, "--stop-ids", "", "--speculative", "mtp", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert [r["prompt_ids"] for r in got["results"]] == [[0, 74, 107], [0, 72, 105]]
    for r in got["results"]:
        assert r["tokens"] == sampling.generate(loaded, [r["prompt_ids"]], int(NEW)).tokens[0]
    assert got["cache_bytes_per_token"] == (20 + 6) * 4 * 4  # the MTP layer's cache counts when it is used
    assert got["drafts"] > 0 and got["acceptance"] == got["accepted"] / got["drafts"]


def _corrupt_shard(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    shard = next(dst.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("argv, match", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt-ids", ""], "prompt 0 is empty"),
    (["--prompt-ids", "3,x"], "--prompt-ids must be comma-separated integers"),
    (["--prompt-ids", "3,300"], "token id 300 is outside the vocabulary"),
    (["--prompt-ids", ",".join(["3"] * 500), "--max-new-tokens", "20"], "max_position_embeddings=512"),
    (["--prompt", "hi", "--top-p", "2"], "top_p must be in"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "hi", "--stop-ids", "999"], "stop token id 999"),
    (["--prompt", "hi", "--speculative", "eagle"], "invalid choice"),
    ([], "give at least one --prompt"),
    (["--prompt", "hi", "--mesh", "expert=x"], "--mesh expert must be an integer"),
    (["--prompt", "hi", "--mesh", "pipeline=2"], "--mesh takes axis=size pairs"),
    (["--prompt", "hi", "--mesh", "expert=8"], "fixed axes product 8"),  # one device here
])
def test_bad_prompt_or_flag(hf_dir, capsys, argv, match):
    code, _out, err = run(["--checkpoint", hf_dir, *argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "cannot load checkpoint"),
    ("bad_json", "cannot load checkpoint"),
    ("truncated", "cannot load checkpoint"),
])
def test_bad_checkpoint_dir(hf_dir, tmp_path, capsys, case, match):
    path = tmp_path / case
    if case == "file":
        path.write_text("not a checkpoint")
    elif case == "empty":
        path.mkdir()
    elif case == "bad_json":
        shutil.copytree(hf_dir, path)
        (path / "config.json").write_text("{not json")
    elif case == "truncated":
        _corrupt_shard(hf_dir, path)
    code, _out, err = run(["--checkpoint", path, "--prompt", "hi"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_process_exit_status_and_one_line(tmp_path):
    """As a process: status 2 and a single stderr line, no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(tmp_path / "nope"),
                           "--prompt", "hi"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: checkpoint") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_fp8_dir_on_a_mesh_equals_unsharded_dequantised(tmp_path):
    """`--mesh expert=8` on 8 fake devices, FP8 weights kept: the JSON tokens of a batch of 3 prompts are those of
    generate on the dequantised model on one device."""
    from dsv3_jax.interop import hf
    from tests import xla_env

    path = tmp_path / "fp8"
    hf.save(create(load_config("tiny").model, seed=1), path, fp8=True)
    prompts = [[0, 72, 105], [5, 9, 33, 2, 7, 11, 40, 1], [100]]
    argv = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(path), "--mesh", "expert=8", "--json",
            "--max-new-tokens", NEW, "--stop-ids", ""]
    argv += [a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=xla_env.env(8), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["mesh"] == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    got = [r["tokens"] for r in out["results"]]
    assert got == sampling.generate(hf.load(path), prompts, int(NEW)).tokens


@pytest.mark.slow
def test_our_checkpoint_end_to_end(tmp_path):
    """A checkpoint written by our Checkpointer, sampled by `python sample.py` as a process."""
    from dsv3_jax.parallel.sharding import make_mesh
    from dsv3_jax.train import checkpoint
    from dsv3_jax.train import state as train_state

    cfg = load_config("tiny", [f"train.run_dir={tmp_path / 'run'}"])
    state, _, _ = train_state.init_state(cfg, make_mesh(cfg.mesh))
    saver = checkpoint.Checkpointer(cfg.train.run_dir, every=1, keep=1, async_save=False)
    saver.save(0, state._asdict(), {}, cfg, force=True)
    saver.close()
    (tmp_path / "run" / "config.json").write_text("{}")  # a stray config.json must not make it look like HF
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", cfg.train.run_dir,
                           "--prompt", "ab", "--prompt", "abcd", "--max-new-tokens", "5", "--speculative", "mtp",
                           "--json"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [r["prompt_ids"] for r in got["results"]] == [[0, 99, 100], [0, 99, 100, 101, 102]]
    assert all(1 <= len(r["tokens"]) <= 5 for r in got["results"])
    assert got["cache_bytes_per_token"] == (20 + 6) * 4 * 4 and got["drafts"] >= 0
