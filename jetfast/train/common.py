"""Command-line plumbing shared by the trainers."""

from __future__ import annotations

def add_execution_arguments(parser, seed_help: str):
    """The options every trainer has: seed, torch threads, progress bar."""
    group = parser.add_argument_group("execution")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    return group


def run_trainer(command: str, train, args, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``train(args)``: errors the user can fix print one line and exit 2; the
    process group is torn down whatever happens."""
    import sys

    from jetfast.distributed import cleanup
    from jetfast.errors import RunDirExists, TrainingDiverged

    try:
        train(args)
    except (FileNotFoundError, RunDirExists, TrainingDiverged, ValueError, *user_errors) as exc:
        print(f"jetfast {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0
