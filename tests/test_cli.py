"""The command line as a whole: --help without torch, defaults that match the library,
and one way of reporting errors for every command."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jetfast.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
NAMES = [name for name, _, _ in COMMANDS]


def subparser(name: str):
    """The argparse parser of command ``name`` ("data generate" for nested commands)."""
    parser = build_parser()
    for word in name.split():
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[word]
    return parser


def defaults(name: str) -> dict:
    return {a.dest: a.default for a in subparser(name)._actions if a.dest not in ("help",) and not a.dest.startswith("_")}


# -- --help answers without loading torch ----------------------------------------------------------
@pytest.mark.parametrize("argv", [[], *[name.split() for name in NAMES]], ids=["jetfast", *NAMES])
def test_help_does_not_import_torch(argv):
    code = (
        "import json, sys\n"
        "from jetfast.cli import main\n"
        "try:\n"
        f"    main({argv + ['--help']!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules, 'numpy': 'numpy' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    *help_text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result == {"status": 0, "torch": False, "numpy": False}, result
    assert "usage: jetfast" in "\n".join(help_text)


def test_python_m_jetfast_cli_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "jetfast.cli", "--version"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("jetfast "), proc.stderr


# -- the options are the library's -----------------------------------------------------------------
def _signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_trainer_options_are_the_dataclass_fields():
    from dataclasses import MISSING, fields

    from jetfast.train.gpt import GPTTraining
    from jetfast.train.vae import VAETraining

    for name, options in (("train-vae", VAETraining), ("train-gpt", GPTTraining)):
        parsed = defaults(name)
        declared = {f.name: f.default for f in fields(options)}
        assert list(parsed) == list(declared), name  # config.json records them in this order
        for key, value in declared.items():
            if value is not MISSING:
                assert parsed[key] == value, (name, key)


@pytest.mark.parametrize("name, function, renamed", [
    ("fit-bins", "jetfast.latent.fit:fit_run_bins", {}),
    ("encode", "jetfast.latent.encode:encode_run", {}),
    ("evaluate-vae", "jetfast.evaluate.vae:evaluate_vae", {}),
    ("generate", "jetfast.generation.writer:generate_file", {}),
    ("evaluate", "jetfast.evaluate.report:evaluate", {"threshold": "thresholds", "no_plots": "plots"}),
    ("data generate", "jetfast.sim.simulate:generate_jets", {"quiet": "progress"}),
])
def test_command_defaults_are_the_library_defaults(name, function, renamed):
    import importlib

    module, attribute = function.split(":")
    library = _signature_defaults(getattr(importlib.import_module(module), attribute))
    checked = 0
    for dest, default in defaults(name).items():
        key = renamed.get(dest, "progress" if dest == "no_progress" else dest)
        if key not in library:
            continue
        expected = library[key]
        if key in ("progress", "plots"):  # --no-progress, --quiet, --no-plots switch them off
            expected = not expected
        assert default == (tuple(expected) if isinstance(default, tuple) else expected), (name, dest)
        checked += 1
    assert checked >= 3, (name, checked)


def test_choices_spelled_in_the_command_line_are_the_library_ones():
    from jetfast import bins
    from jetfast.cli.evaluate import DEFAULT_PT_EDGES, DEFAULT_THRESHOLDS
    from jetfast.cli.latent import BIN_METHODS
    from jetfast.evaluate import observables, response
    from jetfast.generation.conditions import CLASS_CHOICES
    from jetfast.models.vae import RECON_KINDS

    assert BIN_METHODS == bins.METHODS
    assert DEFAULT_THRESHOLDS == tuple(observables.DEFAULT_THRESHOLDS)
    assert DEFAULT_PT_EDGES == response.DEFAULT_PT_EDGES
    choices = {a.dest: a.choices for a in subparser("generate")._actions}
    assert tuple(choices["cls"]) == CLASS_CHOICES
    choices = {a.dest: a.choices for a in subparser("train-vae")._actions}
    assert tuple(choices["recon"]) == RECON_KINDS


# -- errors: one line and status 2 everywhere --------------------------------------------------------
USER_MISTAKES = {
    "data generate": lambda tmp: ["--n", "0", "--out", str(tmp / "jets.h5"), "--quiet"],
    "train-vae": lambda tmp: ["--data", str(tmp / "missing.h5"), "--out", str(tmp / "run"), "--no-progress"],
    "fit-bins": lambda tmp: [str(tmp / "no_run"), "--no-progress"],
    "encode": lambda tmp: [str(tmp / "no_run"), "--no-progress"],
    "train-gpt": lambda tmp: [str(tmp / "no_run"), "--no-progress"],
    "evaluate-vae": lambda tmp: [str(tmp / "no_run"), "--no-progress"],
    "generate": lambda tmp: [str(tmp / "no_run"), "--n", "3", "--out", str(tmp / "gen.h5")],
    "demo": lambda tmp: ["--out", str(tmp / "demo"), "--jets", "0"],
    "evaluate": lambda tmp: ["--real", str(tmp / "missing.h5"), "--gen", str(tmp / "gen.h5"), "--out", str(tmp / "eval")],
}


@pytest.mark.parametrize("name", NAMES)
def test_user_errors_are_one_line_and_status_2(name, tmp_path, capsys):
    assert main([*name.split(), *USER_MISTAKES[name](tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # warnings may come first; the error is one line, the last
    assert [line for line in err if ": error: " in line] == err[-1:], err
    assert err[-1].startswith(f"jetfast {name}: error: "), err


def test_interrupt_is_status_130(monkeypatch, capsys):
    import jetfast.cli.latent

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(jetfast.cli.latent, "run_encode", interrupted)
    assert main(["encode", "RUN_DIR"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_an_error_caused_by_ctrl_c_is_an_interruption(monkeypatch, capsys):
    import jetfast.cli.latent

    def import_cut_short(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # what an extension module's import turns Ctrl-C into
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(jetfast.cli.latent, "run_encode", import_cut_short)
    assert main(["encode", "RUN_DIR"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_error_line_never_ends_a_progress_bar(monkeypatch, capsys):
    import jetfast.cli.latent
    from jetfast.errors import InvalidArgument

    def fails_half_way(args):
        from tqdm.auto import tqdm

        bar = tqdm(total=10, desc="encoding")  # left open: the traceback keeps it alive
        bar.update(3)
        raise InvalidArgument("a bad value")

    monkeypatch.setattr(jetfast.cli.latent, "run_encode", fails_half_way)
    assert main(["encode", "RUN_DIR"]) == 2
    err = capsys.readouterr().err
    assert "encoding" in err and err.endswith("\njetfast encode: error: a bad value\n"), err


@pytest.mark.parametrize("device, message", [("foo", "'foo' is not a torch device"),
                                             ("cuda:0", "no CUDA device is available here")])
def test_a_device_this_machine_lacks_is_a_usage_error(device, message, capsys, tmp_path):
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for argv in (["generate", "RUN", "--n", "2", "--out", str(tmp_path / "g.h5")], ["encode", "RUN"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--device", device])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"jetfast {argv[0]}: error: argument --device: ") and message in err[-1], err
    assert list(tmp_path.iterdir()) == []
