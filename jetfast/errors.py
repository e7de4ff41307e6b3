"""The errors a user can fix: bad arguments, missing or invalid files, refused settings.

Every ``jetfast`` command reports these as one line, ``jetfast <command>: error: <message>``,
and exits with status 2; anything else is a bug and keeps its traceback. Each type also
derives from the built-in exception it refines (``ValueError``, ``OSError``, ...), so code
that catches those keeps working. Missing, existing and unwritable paths are the built-in
``FileNotFoundError``, ``FileExistsError``, ``IsADirectoryError``, ``NotADirectoryError``
and ``PermissionError``; :data:`USER_ERRORS` counts them as user errors too.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message says what was found and what to do."""


class InvalidArgument(UserError, ValueError):
    """A value or setting jetfast refuses (a non-positive count, an unknown name, ...)."""


class JetFileError(UserError, ValueError):
    """A jet file that does not follow the data contract."""


class JetReadError(UserError, OSError):
    """A jet file that cannot be read (a corrupt chunk, a truncated file)."""


class RunDirError(UserError, ValueError):
    """A run directory whose files are incomplete or do not fit together (or with the jet file)."""


class RunDirExists(UserError, FileExistsError):
    """``--out`` names a non-empty directory and neither resume nor overwrite was asked for."""


class BinFitError(UserError, ValueError):
    """The latents cannot be binned as asked (too few vectors, non-finite values, ...)."""


class CodesFileError(UserError, ValueError):
    """The codes file is missing a dataset or holds values the model cannot learn."""


class GenerationMismatch(UserError, ValueError):
    """A partial output written with other settings than the ones asked to resume."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
