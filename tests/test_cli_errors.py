"""The command line answers bad options like a CLI: one line naming the option, exit status 2.

Every case here is rejected before any work starts (no training, calibration or compression), so
the whole file runs in seconds; the one subprocess case checks the installed ``obcjax`` script's
real stderr and exit status.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from obcjax import cli
from obcjax.cli import main

# (argv, the flag the line must name, a piece of the accepted form it must show)
# "{tmp}" is the test's tmp_path; every compress case writes to --out {tmp}/out, which must not
# be created.
BAD = [
    (["--prune", "abc"], "--prune", "2:4"),
    (["--prune", "2:0"], "--prune", "0 < N < M"),
    (["--prune", "2:4:8"], "--prune", "2:4"),
    (["--prune", "1.5"], "--prune", "[0, 1)"),
    (["--prune", "-0.1"], "--prune", "[0, 1)"),
    (["--prune"], "--prune", "expected one argument"),
    (["--prune", "2:4"], "--prune", "multiple of 4"),  # LeNet-5's conv2 has 54 input columns
    (["--wbits", "4.5"], "--wbits", "2..8"),
    (["--wbits", "-1"], "--wbits", "2..8"),
    (["--wbits", "9"], "--wbits", "2..8"),
    (["--prune", "none", "--wbits", "none"], "--prune", "nothing to do"),
    (["--levels", "foo"], "--levels", "0.5+w4"),
    (["--budget", "16x", "--levels", "0.5,foo"], "--levels", "0.5+w4"),
    (["--budget", "16x", "--levels", "0.5+0.6"], "--levels", "0.5+w4"),
    (["--budget", "16x", "--levels", "8w8a"], "--levels", "--abits"),
    (["--budget", "bops=8x", "--abits", "4,8", "--levels", "0.5+w4"], "--levels", "8w8a"),
    (["--levels", "0.5,w4"], "--levels", "--budget"),
    (["--database", "{tmp}/db"], "--database", "--budget"),
    (["--sweep", "0.5,abc"], "--sweep", "0.5,0.7,0.9"),
    (["--sweep", "0.5,1.5"], "--sweep", "[0, 1)"),
    (["--keep", "["], "--keep", "regular expression"),
    (["--model", "mlp", "--keep", "nosuch"], "--keep", "fc1, fc2, fc3"),
    (["--model", "nosuch"], "--model", "lenet5"),
    (["--data", "nosuch"], "--data", "mnist1d"),
    (["--model", "cnn1d", "--data", "digits"], "--data", "mnist1d"),
    (["--solvers", "foo"], "--solvers", "obc, magnitude, gptq"),
    (["--solvers", "obc,foo"], "--solvers", "obc, magnitude, gptq"),
    (["--solvers", ""], "--solvers", "obc, magnitude, gptq"),
    (["--nsamples", "-5"], "--nsamples", ">= 0"),
    (["--nsamples", "1e3"], "--nsamples", ">= 0"),
    (["--seed", "-1"], "--seed", ">= 0"),
    (["--rel-damp", "-1"], "--rel-damp", ">= 0"),
    (["--rel-damp", "nan"], "--rel-damp", ">= 0"),
    (["--mode", "bogus"], "--mode", "one-pass"),
    (["--budget", "abc"], "--budget", "bops=8x"),
    (["--budget", "0.5x"], "--budget", ">= 1"),
    (["--budget", "speed=2x"], "--budget", "flops"),
    (["--abits", "4.5"], "--abits", "4,8"),
    (["--budget", "bops=8x", "--abits", "4,9"], "--abits", "4..8"),
    (["--abits", "4,8"], "--abits", "--budget bops=Nx"),
    (["--budget", "16x", "--abits", "4,8"], "--budget", "bops=Nx"),
    (["--save", "{tmp}/missing/m.safetensors"], "--save", "does not exist"),
    (["--save", "{tmp}"], "--save", "file path"),
    (["--out", "{tmp}/a_file"], "--out", "folder"),
    (["--bogus"], "--bogus", "unrecognized"),
    # the transformer's own options (obcjax compress --model minilm ...)
    (["--model", "minilm", "--bits", "4.5"], "--bits", "2..8"),
    (["--model", "minilm", "--group", "-1"], "--group", ">= 0"),
    (["--model", "minilm", "--group", "x"], "--group", "int"),
    (["--model", "minilm", "--solver", "foo"], "--solver", "gptq"),
    (["--model", "minilm", "--prune", "2:4:8"], "--prune", "2:4"),
    # a user's model: --model package.module:factory (tests/cli_user_model.py)
    (["--model", "tests.cli_user_model:"], "--model", "package.module:factory"),
    (["--model", "no such:factory"], "--model", "package.module:factory"),
    (["--model", "tests.no_such_module:factory"], "--model", "cannot import"),
    (["--model", "tests.cli_user_model:nosuch"], "--model", "has no 'nosuch'"),
    (["--model", "tests.cli_user_model:NOT_CALLABLE"], "--model", "not a function"),
    (["--model", "tests.cli_user_model:factory_bad_tuple"], "--model",
     "(model, variables, batches)"),
    (["--model", "tests.cli_user_model:factory_raises"], "--model", "no data here"),
    (["--model", "tests.cli_user_model:factory_not_a_model"], "--model", "flax.linen.Module"),
    (["--model", "tests.cli_user_model:factory", "--data", "digits"], "--data", "factory"),
    (["--model", "tests.cli_user_model:factory", "--keep", "nosuch"], "--keep", "fc1, fc2, fc3"),
    (["--model", "tests.cli_user_model:factory", "--budget", "bops=8x", "--abits", "4,8"],
     "--abits", "one width"),
]

BAD_OTHER = [
    (["evaluate", "--load", "{tmp}/missing.safetensors"], "--load", "no such file"),
    (["evaluate", "--load", "{tmp}/corrupt.safetensors"], "--load", "obcjax compress --save"),
    (["evaluate", "--load", "{tmp}"], "--load", "not a file"),
    (["evaluate", "--load", "{tmp}/anonymous.safetensors"], "--model/--data", "give --model"),
    (["evaluate", "--load", "{tmp}/mlp.safetensors"], "--load", "does not hold a mlp model"),
    (["evaluate", "--load", "{tmp}/mlp.safetensors", "--model", "nosuch"], "--model", "lenet5"),
    (["evaluate", "--load", "{tmp}/mlp.safetensors", "--model",
      "tests.cli_user_model:factory_no_eval"], "--model", "no evaluate function"),
    (["evaluate", "--load", "{tmp}/mlp.safetensors", "--model", "tests.cli_user_model:factory"],
     "--load", "does not hold the parameters"),
    (["evaluate"], "--load", "required"),
    (["train", "--model", "nosuch"], "--model", "lenet5"),
    (["train", "--seed", "-1"], "--seed", ">= 0"),
    (["bogus"], "command", "compress"),
]


@pytest.fixture
def tmp(tmp_path):
    from obcjax import export

    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00garbage")
    params = {"params": {"fc1": {"kernel": np.ones((4, 3), np.float32)}}}
    export.save_params(tmp_path / "anonymous.safetensors", params)
    export.save_params(tmp_path / "mlp.safetensors", params,
                       metadata={"model": "mlp", "data": "digits"})
    return tmp_path


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's errors exit with 2 by SystemExit
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _check_one_line(rc, err, flag, form):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    line = lines[0]
    assert line.startswith("obcjax: error: "), line
    assert flag in line, line
    assert form in line, line
    return line


@pytest.mark.parametrize("argv,flag,form", BAD, ids=[" ".join(c[0]) for c in BAD])
def test_compress_bad_option_is_one_line(argv, flag, form, tmp, capsys):
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    out = tmp / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    rc, stdout, err = _run(["compress", *argv], capsys)
    _check_one_line(rc, err, flag, form)
    assert stdout == ""
    assert not out.exists()  # nothing made for a run that never started


@pytest.mark.parametrize("argv,flag,form", BAD_OTHER, ids=[" ".join(c[0]) for c in BAD_OTHER])
def test_evaluate_train_bad_option_is_one_line(argv, flag, form, tmp, capsys):
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    rc, stdout, err = _run(argv, capsys)
    _check_one_line(rc, err, flag, form)
    assert stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(cli.UsageError, match="--model"):
        main(["compress", "--debug", "--model", "nosuch", "--out", str(tmp_path / "out")])


def test_default_command_is_compress(capsys):
    rc, _, err = _run(["--prune", "abc"], capsys)
    _check_one_line(rc, err, "--prune", "2:4")


def test_solvers_match_the_library():
    from obcjax import transforms

    assert cli.SOLVERS == transforms.SOLVERS


def test_readme_commands_pass_the_checks(tmp_path, monkeypatch):
    # the README's command lines are valid; `--save runs/m.safetensors` goes into a folder that
    # --out (runs/compress) makes
    monkeypatch.chdir(tmp_path)
    for argv in (["--prune", "0.8", "--sweep", "0.5,0.7,0.8,0.9"],
                 ["--prune", "2:4", "--wbits", "4", "--model", "resnet"],
                 ["--budget", "16x"],
                 ["--mode", "sequential", "--prune", "0.7"],
                 ["--budget", "bops=32x", "--abits", "4,8"],
                 ["--save", "runs/m.safetensors"],
                 ["--model", "cnn1d"]):
        args = cli.build_parser().parse_args(["compress", *argv])
        plan = cli._check_compress(args)
        assert plan.keep_list  # the first layer stays dense
    assert not (tmp_path / "runs").exists()


def test_failed_run_removes_only_the_folders_it_made(tmp_path, monkeypatch, capsys):
    from obcjax.zoo import train as ztrain

    def late_user_error(*a, **k):
        raise cli.UsageError("--budget", "cannot be met")

    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ztrain, "pretrained", late_user_error)
    out = tmp_path / "new" / "deeper"
    rc, _, err = _run(["compress", "--model", "mlp", "--out", str(out)], capsys)
    _check_one_line(rc, err, "--budget", "cannot be met")
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr(ztrain, "pretrained", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        main(["compress", "--model", "mlp", "--out", str(out)])
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        main(["compress", "--model", "mlp", "--out", str(existing)])
    assert existing.is_dir()  # a folder that was there before is never removed


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    # Without the zoo extra the zoo's data sets fail in obcjax._extras.require: one line that
    # names the extra, exit status 1, no traceback, no output folder.
    from obcjax.zoo import data as zdata

    def no_sklearn(*a, **k):
        from obcjax._extras import require

        require("sklearn_not_installed_here", "obcjax.zoo.digits")

    monkeypatch.setattr(zdata, "load_dataset", no_sklearn)
    out = tmp_path / "out"
    rc, stdout, err = _run(["compress", "--model", "mlp", "--out", str(out)], capsys)
    assert rc == 1 and stdout == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.strip().endswith("pip install obcjax[zoo]"), err
    assert not out.exists()


def test_installed_script_answers_on_stderr(tmp_path):
    script = Path(sys.executable).parent / "obcjax"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "obcjax.cli"]
    env = {**os.environ, "OBCJAX_NO_COMPILE_CACHE": "1"}
    proc = subprocess.run([*cmd, "compress", "--prune", "abc"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "obcjax: error: --prune: expected " + cli.PRUNE_FORM + "; got 'abc'"]
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"  # no runs/ folder
    # --model package.module:factory finds a module of the folder the command runs in
    (tmp_path / "my_model.py").write_text("def factory():\n    return None, None\n")
    proc = subprocess.run([*cmd, "compress", "--model", "my_model:factory"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "obcjax: error: --model: my_model:factory() returned a 2-tuple; expected (model, "
        "variables, batches) or (model, variables, batches, evaluate)"]
