"""The table of bad inputs and faults every command is tried with, and the runner that tries them.

Each case is a command line as a user types it, run in a directory of its own that holds the inputs below (and, for
the cases that need one, a copy of a trained run dir). The expected answer is one line: `error: ...` with status 2,
or, where the command can go on (a broken newest checkpoint), one `warning: ...` line and status 0. Many cases run
in one process (`python tests/cli_faults.py`): each command runs as `__main__` through runpy, exactly as `python -m`
and `python train.py` run it, so a tool that defined its own error class would show up here. docs/testing.md lists
the cases with the line each printed (`python tests/cli_faults.py --table RUN_DIR` prints that table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # what is wrong
    command: str  # run in the case's directory
    expect: str  # regex the one `error:` / `warning:` line must match
    code: int = 2
    run: str | None = None  # copy of a trained run dir as ./run: "good", "broken" (newest step), "all_broken"
    absent: tuple[str, ...] = ()  # globs that must match nothing afterwards (outputs not written)
    present: tuple[str, ...] = ()  # globs that must match something afterwards


TOK = "python -m dsv3_jax.tools.tokenizer train"
PREP = "python -m dsv3_jax.tools.prepare"
EVAL = "python -m dsv3_jax.tools.eval --batch-size 2 --batches 1"
SAMPLE = "python sample.py --max-new-tokens 4"
TRAIN = "python train.py --config tiny train.steps=2 data.seq_len=32 train.run_dir=out"
PLAN = "python -m dsv3_jax.tools.plan --config tiny"
BENCH = "python -m dsv3_jax.tools.bench --quick"


CASES = [
    # tokenizer training
    Case("tokenizer: glob matches no file", f"{TOK} --source 'nope/*.txt' --vocab-size 300 --out tok.json",
         r"matched no files", absent=("tok.json",)),
    Case("tokenizer: JSONL without the text field", f"{TOK} --source nofield.jsonl --vocab-size 300 --out tok.json",
         r"nofield\.jsonl:1: no field 'text'", absent=("tok.json",)),
    Case("tokenizer: --out is a directory", f"{TOK} --source good.jsonl --vocab-size 300 --out adir",
         r"--out adir is a directory"),
    Case("tokenizer: --out inside a file", f"{TOK} --source good.jsonl --vocab-size 300 --out afile/tok.json",
         r"afile is a file, not a directory"),
    Case("tokenizer: empty training set", f"{TOK} --source empty.txt --vocab-size 300 --out tok.json",
         r"holds no non-empty documents", absent=("tok.json",)),
    Case("tokenizer: binary files", f"{TOK} --source 'bin/*' --vocab-size 300 --out tok.json",
         r"bin/a\.bin: binary data", absent=("tok.json",)),
    Case("tokenizer: text that is not UTF-8", f"{TOK} --source latin1.txt --vocab-size 300 --out tok.json",
         r"latin1\.txt: not UTF-8 text", absent=("tok.json",)),
    Case("tokenizer: vocabulary larger than the corpus yields",
         f"{TOK} --source good.jsonl --vocab-size 5000 --out tok.json", r"yields only \d+ tokens, fewer than "
         r"--vocab-size 5000", absent=("tok.json",)),
    Case("tokenizer: vocabulary below the byte alphabet", f"{TOK} --source good.jsonl --vocab-size 100 --out tok.json",
         r"--vocab-size must be at least 258", absent=("tok.json",)),
    Case("tokenizer: unknown subcommand", "python -m dsv3_jax.tools.tokenizer trian --source good.jsonl "
         "--vocab-size 300 --out tok.json", r"invalid choice: 'trian'"),
    Case("tokenizer: --vocab-size not a number", f"{TOK} --source good.jsonl --vocab-size lots --out tok.json",
         r"argument --vocab-size: invalid int value"),
    # prepare
    Case("prepare: binary files", f"{PREP} --source 'bin/*' --out prepared", r"bin/a\.bin: binary data",
         absent=("prepared",)),
    Case("prepare: empty JSONL", f"{PREP} --source empty.jsonl --out prepared", r"holds no non-empty documents",
         absent=("prepared",)),
    Case("prepare: --out is a file", f"{PREP} --source good.jsonl --out good.jsonl",
         r"--out good\.jsonl: good\.jsonl is a file"),
    Case("prepare: --out inside a file", f"{PREP} --source good.jsonl --out afile/prepared",
         r"afile is a file, not a directory"),
    Case("prepare: glob matches no file", f"{PREP} --source 'nope/*.jsonl' --out prepared", r"matched no files",
         absent=("prepared",)),
    Case("prepare: a line that is not JSON", f"{PREP} --source badline.jsonl --out prepared",
         r"badline\.jsonl:2: invalid JSON", absent=("prepared",)),
    Case("prepare: text field holds a number", f"{PREP} --source numfield.jsonl --out prepared",
         r"field 'text' is int, not a string", absent=("prepared",)),
    Case("prepare: JSON file that is not a tokenizer", f"{PREP} --source good.jsonl --tokenizer notok.json "
         "--out prepared", r"notok\.json is not a tokenizer\.json", absent=("prepared",)),
    Case("prepare: tokenizer file missing", f"{PREP} --source good.jsonl --tokenizer missing.json --out prepared",
         r"missing\.json'? does not exist", absent=("prepared",)),
    Case("prepare: --out holds other files", f"{PREP} --source good.jsonl --out adir_full",
         r"is not empty and holds no prepare\.json"),
    Case("prepare: eval fraction out of range", f"{PREP} --source good.jsonl --eval-fraction 1.5 --out prepared",
         r"eval_fraction must be in \[0, 1\)", absent=("prepared",)),
    Case("prepare: zero processes", f"{PREP} --source good.jsonl --processes 0 --out prepared",
         r"--processes must be positive", absent=("prepared",)),
    Case("prepare: --out missing", f"{PREP} --source good.jsonl", r"arguments are required: --out"),
    # params, plot, experiments
    Case("params: no preset", "python -m dsv3_jax.tools.params", r"usage: python -m dsv3_jax\.tools\.params"),
    Case("params: unknown preset", "python -m dsv3_jax.tools.params tinny", r"unknown preset 'tinny'"),
    Case("params: unknown config key", "python -m dsv3_jax.tools.params tiny model.hiden_size=8", r"hiden_size"),
    Case("plot: not a run dir", "python -m dsv3_jax.tools.plot adir --out plots", r"adir has no metrics\.jsonl",
         absent=("plots/*.png",)),
    Case("plot: --out is a file", "python -m dsv3_jax.tools.plot fakerun --out afile", r"--out afile is a file"),
    Case("plot: labels do not match runs", "python -m dsv3_jax.tools.plot fakerun --out plots --labels a,b",
         r"--labels has 2 names for 1 run dirs", absent=("plots",)),
    Case("plot: a metrics line that is not JSON", "python -m dsv3_jax.tools.plot badrun --out plots",
         r"metrics\.jsonl:1: not a metrics record", absent=("plots/*.png",)),
    Case("experiments: unknown experiment", "python -m dsv3_jax.tools.experiments balanse --out exp",
         r"unknown experiment 'balanse'", absent=("exp",)),
    Case("experiments: zero seeds", "python -m dsv3_jax.tools.experiments mtp --seeds 0 --out exp",
         r"--seeds must be >= 1", absent=("exp",)),
    # plan, bench, bench_decode
    Case("plan: unknown preset", "python -m dsv3_jax.tools.plan --config tinny --devices 2", r"unknown preset 'tinny'"),
    Case("plan: unknown config key", f"{PLAN} --devices 2 model.hiden_size=8",
         r"unknown config key 'model\.hiden_size'; did you mean model\.hidden_size"),
    Case("plan: zero devices", f"{PLAN} --devices 0", r"--devices must be positive, got 0"),
    Case("plan: --devices not a number", f"{PLAN} --devices two", r"argument --devices: invalid int value: 'two'"),
    Case("plan: mesh larger than --devices", f"{PLAN} --devices 2 mesh.data=1 mesh.fsdp=4",
         r"has 4 devices, --devices is 2"),
    Case("plan: unknown hardware", f"{PLAN} --devices 2 --hardware H1000", r"unknown --hardware 'H1000'; did you "
         r"mean H100\?"),
    Case("plan: hardware listed only for MFU", f"{PLAN} --devices 2 --hardware L40S",
         r"--hardware L40S: the table holds only its matmul peak"),
    Case("bench: unknown preset", f"{BENCH} --config tinny", r"unknown preset 'tinny'"),
    Case("bench: unknown config key", f"{BENCH} --config tiny model.hiden_size=8", r"model\.hiden_size"),
    Case("bench: unknown section", f"{BENCH} --only train,bogus", r"unknown section\(s\) \['bogus'\]"),
    Case("bench: accelerator suite without --out", "python -m dsv3_jax.tools.bench --suite accelerator",
         r"--suite accelerator needs --out DIR"),
    Case("bench_decode: --batches not integers", "python -m dsv3_jax.tools.bench_decode --batches 1,x",
         r"--batches must be comma-separated integers, got '1,x'"),
    Case("bench_decode: zero new tokens", "python -m dsv3_jax.tools.bench_decode --new-tokens 0",
         r"--new-tokens and --batches must be positive"),
    # eval and sample without a model
    Case("eval: checkpoint dir missing", f"{EVAL} --checkpoint nope", r"--checkpoint nope does not exist"),
    Case("eval: a dir that is no checkpoint", f"{EVAL} --checkpoint adir", r"is neither a run dir"),
    Case("eval: negative --batches", "python -m dsv3_jax.tools.eval --checkpoint adir --batches -1",
         r"--batches must be >= 0"),
    Case("sample: checkpoint dir missing", "python sample.py --checkpoint nope --prompt hi",
         r"checkpoint nope does not exist"),
    Case("sample: no --checkpoint", "python sample.py --prompt hi", r"arguments are required: --checkpoint"),
    # train.py
    Case("train: unknown config key", f"{TRAIN} train.stepz=3", r"stepz", absent=("out",)),
    Case("train: unknown flag", f"{TRAIN} --stepz 3", r"unrecognized arguments: --stepz", absent=("out",)),
    Case("train: mesh larger than the devices", f"{TRAIN} mesh.fsdp=2",
         r"XLA_FLAGS=--xla_force_host_platform_device_count=N", absent=("out",)),
    Case("train: binary data source", f"{TRAIN} data.source='bin/*' data.cache_dir=cache",
         r"bin/a\.bin: binary data", absent=("out", "cache/*/*")),
    Case("train: empty data source", f"{TRAIN} data.source=empty.jsonl data.cache_dir=cache",
         r"holds no non-empty documents", absent=("out", "cache/*/*")),
    Case("train: rows longer than the context", "python train.py --config tiny data.seq_len=1024 train.run_dir=out",
         r"max_position_embeddings", absent=("out",)),
    # with a trained run dir (steps 2 and 4)
    Case("eval: newest checkpoint truncated", f"{EVAL} --checkpoint run", r"warning: checkpoint step 4 .* failed to "
         r"restore \(ValueError: OUT_OF_RANGE: Error reading .*\); set aside as 4\.unrestorable-\d+; using step 2",
         code=0, run="broken", present=("run/checkpoints/4.unrestorable-*",)),
    Case("sample: newest checkpoint truncated", f"{SAMPLE} --checkpoint run --prompt hi", r"warning: checkpoint "
         r"step 4 .* set aside as 4\.unrestorable-\d+; using step 2", code=0, run="broken",
         present=("run/checkpoints/4.unrestorable-*",)),
    Case("sample: a step dir that is truncated", f"{SAMPLE} --checkpoint run/checkpoints/4 --prompt hi",
         r"checkpoints/4 failed to restore \(ValueError: OUT_OF_RANGE: Error reading \"params\.", run="broken",
         present=("run/checkpoints/4",)),
    Case("train: every checkpoint broken", "python train.py --config tiny train.steps=6 data.seq_len=32 "
         "data.max_documents=100 train.run_dir=run", r"no checkpoint in .* could be restored \(steps \[2, 4\]",
         run="all_broken", present=("run/checkpoints/2", "run/checkpoints/4")),
    Case("eval: --seq-len beyond the context", f"{EVAL} --checkpoint run --seq-len 5000",
         r"data\.seq_len 5000 \(--seq-len\) exceeds the model's context, model\.max_position_embeddings=512",
         run="good"),
    Case("eval: held-out data are binary", f"{EVAL} --checkpoint run --data 'bin/*'", r"bin/a\.bin: binary data",
         run="good"),
    Case("eval: held-out data are empty", f"{EVAL} --checkpoint run --data empty.jsonl",
         r"holds no non-empty documents", run="good"),
    Case("sample: prompt and budget beyond the context", "python sample.py --checkpoint run --prompt hi "
         "--max-new-tokens 600", r"beyond model\.max_position_embeddings=512", run="good"),
    Case("sample: JSON file that is not a tokenizer", f"{SAMPLE} --checkpoint run --prompt hi --tokenizer notok.json",
         r"notok\.json is not a tokenizer\.json", run="good"),
    Case("sample: top-p out of range", f"{SAMPLE} --checkpoint run --prompt hi --top-p 2", r"top_p must be in",
         run="good"),
]


def make_inputs(d: pathlib.Path) -> None:
    """The bad (and a few good) inputs the cases name, written fresh into a case's directory."""
    rng = random.Random(0)
    words = ["def", "return", "value", "self", "import", "class", "None", "for", "in", "if", "else", "print"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "good.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                                          for _ in range(40)))
    (d / "nofield.jsonl").write_text('{"body": "text under another key"}\n')
    (d / "numfield.jsonl").write_text('{"text": 5}\n')
    (d / "badline.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    (d / "empty.jsonl").write_text("")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes(("caf\xe9 na\xefve r\xe9sum\xe9 " * 50).encode("latin-1"))
    (d / "bin").mkdir(exist_ok=True)
    (d / "bin" / "a.bin").write_bytes(bytes(rng.randrange(256) for _ in range(12_000)))
    (d / "notok.json").write_text('{"a": 1}\n')
    (d / "afile").write_text("a file\n")
    (d / "adir").mkdir(exist_ok=True)
    (d / "adir_full").mkdir(exist_ok=True)
    (d / "adir_full" / "notes.txt").write_text("someone else's\n")
    for name, metrics in (("fakerun", '{"step": 1, "kind": "train", "loss": 5.0}\n'),
                          ("badrun", 'not json\n{"step": 1, "kind": "train", "loss": 5.0}\n')):
        (d / name).mkdir(exist_ok=True)
        (d / name / "metrics.jsonl").write_text(metrics)
        (d / name / "run_config.json").write_text('{"model": {"n_routed_experts": 8}}\n')


def break_step(run_dir: pathlib.Path, step: int) -> None:
    """Truncate the array files of one checkpoint step to half (as a full disk or a killed copy leaves them)."""
    for f in (run_dir / "checkpoints" / str(step) / "state").rglob("ocdbt.process_*/d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def run_variants(trained: pathlib.Path, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """The run dirs the cases copy: the trained one, its newest step broken, every step broken."""
    out = {"good": trained}
    for name, steps in (("broken", (4,)), ("all_broken", (2, 4))):
        shutil.copytree(trained, root / name)
        for s in steps:
            break_step(root / name, s)
        out[name] = root / name
    return out


def _argv(command: str) -> tuple[str, str, list[str]]:
    """("module" | "path", target, argv) of a command line."""
    words = shlex.split(command)
    assert words[0] == "python"
    if words[1] == "-m":
        return "module", words[2], words[2:]
    return "path", str(REPO / words[1]), words[1:]


def run_case(case: Case, d: pathlib.Path, runs: dict[str, pathlib.Path]) -> dict:
    """Run one case in directory `d` in this process, as `__main__`; its exit status and what it printed."""
    make_inputs(d)
    if case.run:
        shutil.copytree(runs[case.run], d / "run")
    kind, target, argv = _argv(case.command)
    out_file, err_file = d.parent / f"{d.name}.out", d.parent / f"{d.name}.err"
    saved = os.dup(1), os.dup(2)
    cwd, sys_argv = os.getcwd(), sys.argv
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out_file, "wb") as fo, open(err_file, "wb") as fe:
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            os.chdir(d)
            sys.argv = argv
            try:
                if kind == "module":
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException as e:  # noqa: BLE001  (a traceback is what the case must not produce)
                import traceback

                traceback.print_exc()
                code = f"uncaught {type(e).__name__}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.chdir(cwd)
            sys.argv = sys_argv
    for fd in saved:
        os.close(fd)
    return {"code": code, "stdout": out_file.read_text(errors="replace"),
            "stderr": err_file.read_text(errors="replace"),
            "temporaries": sorted(str(p.relative_to(d)) for p in d.rglob(".*.tmp")),
            "absent": {g: sorted(str(p.relative_to(d)) for p in d.glob(g)) for g in case.absent},
            "present": {g: sorted(str(p.relative_to(d)) for p in d.glob(g)) for g in case.present}}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def the_line(stderr: str) -> list[str]:
    """The answer lines of a command: `error:`, `warning:` and `interrupted` lines."""
    return [ln for ln in stderr.splitlines() if ln.startswith(("error:", "warning:", "interrupted"))]


def problems(case: Case, got: dict) -> list[str]:
    """What is wrong with a case's outcome (empty: one line, the right status, nothing half-written)."""
    bad = []
    lines = the_line(got["stderr"])
    if got["code"] != case.code:
        bad.append(f"status {got['code']}, expected {case.code}")
    if len(lines) != 1:
        bad.append(f"{len(lines)} answer lines")
    elif not re.search(case.expect, lines[0]) or not lines[0].startswith("warning:" if case.code == 0 else "error:"):
        bad.append(f"line {lines[0]!r} does not match {case.expect!r}")
    for marker in ("Traceback", "Exception ignored", "Future exception was never retrieved", "<bound method"):
        if marker in got["stderr"]:
            bad.append(f"stderr holds {marker!r}")
    if len(got["stderr"].splitlines()) > 3:  # the answer, plus at most "preparing ..." / sample's cache and timing
        bad.append(f"{len(got['stderr'].splitlines())} stderr lines")
    if got["temporaries"]:
        bad.append(f"half-written files left: {got['temporaries']}")
    bad += [f"{g} was written: {m}" for g, m in got["absent"].items() if m]
    bad += [f"{g} is missing" for g, m in got["present"].items() if not m]
    return bad


def run_groups(cases: list[Case], root: pathlib.Path, trained: str, env: dict | None = None) -> dict:
    """Run `cases` in subprocesses: those whose checkpoint fails to restore one per process (reads a failed restore
    abandoned must not land in another case's stderr), the rest together; {name: outcome}."""
    groups = [[c] for c in cases if c.run not in (None, "good")]
    groups.append([c for c in cases if c.run in (None, "good")])
    out = {}
    for i, group in enumerate(g for g in groups if g):
        d = root / f"group{i}"
        d.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, str(REPO / "tests" / "cli_faults.py"), str(d / "results.json"), str(d),
                            trained, *[c.name for c in group]], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900, check=False)
        if r.returncode:
            raise RuntimeError(f"the case runner failed: {r.stderr[-3000:]}")
        out.update(json.loads((d / "results.json").read_text()))
    return out


def main(argv: list[str]) -> int:
    """`RESULTS.json ROOT TRAINED_RUN_DIR|- NAME...`: run the named cases, write their outcomes; `--table
    TRAINED_RUN_DIR`: run every case and print the markdown table of docs/testing.md."""
    if argv[0] == "--table":
        with tempfile.TemporaryDirectory() as tmp:
            got = run_groups(CASES, pathlib.Path(tmp), argv[1])
        print("| # | bad input or fault | command | exit | the one line printed |\n| --- | --- | --- | --- | --- |")
        for i, c in enumerate(CASES, 1):
            line = (the_line(got[c.name]["stderr"]) or ["(none)"])[0].replace(tmp, "").replace("|", "\\|")
            line = re.sub(r"/[\w/.-]*/(run|nope|adir)\b", r"\1", line)
            print(f"| {i} | {c.name} | `{c.command}` | {got[c.name]['code']} | `{line}` |")
        return 0
    results, root, trained, names = pathlib.Path(argv[0]), pathlib.Path(argv[1]), argv[2], argv[3:]
    runs = run_variants(pathlib.Path(trained), root / "runs") if trained != "-" else {}
    by_name = {c.name: c for c in CASES}
    out = {name: run_case(by_name[name], root / slug(name), runs) for name in names}
    results.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
