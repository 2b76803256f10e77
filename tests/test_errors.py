"""The one error path every command shares (`errors.run_command`): bad input is one line and status 2, Ctrl-C is
one line and status 130 even when a library swallows the KeyboardInterrupt, a bug keeps its traceback."""

import _thread
import signal
import subprocess
import sys
import time

import pytest

from dsv3_jax import errors


@pytest.mark.parametrize("exc, line", [
    (errors.ConfigError("train.steps must be positive,\n got 0"), "error: train.steps must be positive, got 0"),
    (errors.DataError("a.bin: binary data"), "error: a.bin: binary data"),
    (errors.MissingExtra("matplotlib is not installed"), "error: matplotlib is not installed"),
    (FileNotFoundError(2, "No such file or directory", "x.json"), "error: x.json: No such file or directory"),
    (IsADirectoryError(21, "Is a directory", "out"), "error: out: Is a directory"),
])
def test_bad_input_is_one_line_and_status_2(exc, line, capsys):
    def body():
        raise exc

    assert errors.run_command(body) == 2
    assert capsys.readouterr().err == line + "\n"


def test_every_package_error_is_one_class_hierarchy():
    """The CLIs catch `errors.Error`; each type stays a ValueError / ImportError for callers that catch those."""
    for cls in (errors.ConfigError, errors.DataError, errors.HFError, errors.GenerateError, errors.UsageError):
        assert issubclass(cls, errors.Error) and issubclass(cls, ValueError)
    assert issubclass(errors.MissingExtra, errors.Error) and issubclass(errors.MissingExtra, ImportError)


def test_a_bug_keeps_its_traceback():
    def body():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        errors.run_command(body)


def test_bad_flags_are_a_usage_error_in_one_line(capsys):
    parser = errors.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    assert errors.run_command(lambda: parser.parse_args(["--n", "x"]) and 0) == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x' (see tool --help)\n"


def test_ctrl_c_is_one_line_and_status_130(capsys):
    def body():
        _thread.interrupt_main()  # what Ctrl-C does: SIGINT to the main thread, through the installed handler
        time.sleep(5)
        return 0

    assert errors.run_command(body) == errors.INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith("interrupted (Ctrl-C)") and err.count("\n") == 1


def test_a_swallowed_ctrl_c_still_stops_the_command(capsys):
    """Ctrl-C while Python runs a finaliser or a gc callback (JAX has one): the KeyboardInterrupt the handler raises
    there is swallowed with an "Exception ignored" traceback. The command must still stop, with 130 and one line,
    and not run on to the end (a SIGINT once vanished that way and the run finished with status 0)."""
    ran_on = []

    def body():
        handler = signal.getsignal(signal.SIGINT)

        class Finalised:
            def __del__(self):
                handler(signal.SIGINT, None)  # what Python runs when Ctrl-C arrives while this finaliser runs

        Finalised()
        for _ in range(100):  # the re-delivered interrupt lands in here
            time.sleep(0.01)
        ran_on.append(True)
        return 0

    assert errors.run_command(body) == errors.INTERRUPTED
    err = capsys.readouterr().err
    assert not ran_on and err.startswith("interrupted (Ctrl-C)") and err.count("\n") == 1, err
    assert "Exception ignored" not in err


def test_python_m_raises_the_same_classes_the_library_catches(tmp_path):
    """`python -m` runs a tool as __main__: an error class defined in the tool would be a second class. The tools
    define none; a DataError from the library reaches `python -m dsv3_jax.tools.tokenizer` as one line."""
    r = subprocess.run([sys.executable, "-m", "dsv3_jax.tools.tokenizer", "train", "--source", str(tmp_path / "*.x"),
                        "--vocab-size", "300", "--out", str(tmp_path / "t.json")], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: data.source") and r.stderr.count("\n") == 1, r.stderr
