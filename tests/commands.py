"""Running a command as a user does, and what a refused command must look like."""

from __future__ import annotations

import os

from jetfast.cli import main


def run(argv, capsys) -> tuple[int, str]:
    """``jetfast ARGV`` in this process: (exit status, what it wrote to stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def assert_refused(status: int, err: str, command: str, *fragments: str) -> str:
    """Exit status 2 and one error line, the last, naming each of ``fragments``; no traceback.
    Returns the error line."""
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err, err
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    assert lines[-1].startswith(f"jetfast {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def listing(directory) -> dict[str, int]:
    """Every file (with its size) and directory below ``directory``: what a refused command leaves as it was."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory) + "/"] = 0
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = os.path.getsize(path)
    return found


def interrupt_after_first_epoch(patch) -> None:
    """Make a training run stop with Ctrl-C as it saves its second epoch's checkpoint (``patch``: a
    ``monkeypatch`` or its context), leaving the first epoch's checkpoint to resume from."""
    from jetfast.run import RunDir

    real_save = RunDir.save_checkpoint

    def interrupted(self, state, which="last"):
        if state["epoch"] == 1:
            raise KeyboardInterrupt
        return real_save(self, state, which)

    patch.setattr(RunDir, "save_checkpoint", interrupted)
