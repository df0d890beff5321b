"""The errors loha_diffusion raises for things a user can fix, and the one formatter of problem lists.

Every such error derives from `LoHaDiffusionError`, a `ValueError` (so code written against the older
`ValueError`s keeps working): `except LoHaDiffusionError` catches a bad config, file, dataset, adapter name or
command line, and lets programming errors through. The message names the thing (key, file, module) and the fix.
Imports nothing heavy (no torch): the CLI and the training script use these before loading any library.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SHOWN_PER_GROUP = 5  # problems listed per group in a message; the rest are counted


class LoHaDiffusionError(ValueError):
    """Base of every user-facing error of loha_diffusion (bad config, file, data, name or command line)."""


class ConfigError(LoHaDiffusionError):
    """A setting is unknown, has the wrong type or an invalid value: a field of an adapter config
    (`LoHaConfig`, `target_modules` that match nothing, ...), a training setting or a flag. The message names
    the key and the fix."""


class DataError(LoHaDiffusionError):
    """The training data cannot be used as given; the message names the file or folder and the fix."""


class KohyaFormatError(LoHaDiffusionError):
    """A Kohya file, or a model/adapter to be written as one, has problems; the message lists all of them."""


class PeftFormatError(LoHaDiffusionError):
    """A PEFT adapter folder (or a model to be saved as one) has problems; the message lists them."""


class CLIError(LoHaDiffusionError):
    """A command-line problem the user can fix; `loha-diffusion` prints it without a traceback."""


class AdapterNameError(LoHaDiffusionError):
    """An adapter name that cannot be used: not a plain identifier, a torch `Module` attribute, or taken."""


class AdapterNotFoundError(LoHaDiffusionError, KeyError):
    """No adapter of that name on the model or pipeline. Also a `KeyError` (what lookups raised before)."""

    def __str__(self) -> str:
        # KeyError quotes its message (repr); this is a sentence for people.
        return str(self.args[0]) if self.args else ""


class AdapterStateError(LoHaDiffusionError):
    """Adapter tensors or an adapter state that do not fit: missing, unknown or misshaped keys of a state dict,
    an adapter built for another layer, or a fuse of an adapter that is inactive or disabled. The message lists
    every problem."""


class AdapterMergedError(LoHaDiffusionError, RuntimeError):
    """The call would change what a merged (fused) adapter computes; unmerge (`unfuse`) first.
    Also a `RuntimeError` (what it was before)."""


class TrainingDivergedError(LoHaDiffusionError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the likely causes for this
    run's settings. Also a `FloatingPointError` (what it was before)."""


class AdapterFileNotFoundError(LoHaDiffusionError, FileNotFoundError):
    """An adapter file or folder that does not exist. Also a `FileNotFoundError`."""


def format_problems(
    title: str,
    groups: Sequence[tuple[str, Sequence[str]]],
    hints: Iterable[str] = (),
    shown: int = SHOWN_PER_GROUP,
) -> str:
    """One message for many problems: `title`, the `hints` (what to do), then per non-empty group its count
    and label and its first `shown` items (`... and N more`).

    Example:
        >>> print(format_problems("Cannot load 'x':", [("missing keys", ["a", "b"])], ["re-export it"]))
        Cannot load 'x':
          hint: re-export it
          2 missing keys:
            - a
            - b
    """
    lines = [title]
    lines += [f"  hint: {hint}" for hint in hints]
    for label, items in groups:
        if not items:
            continue
        lines.append(f"  {len(items)} {label}:")
        lines += [f"    - {item}" for item in items[:shown]]
        if len(items) > shown:
            lines.append(f"    ... and {len(items) - shown} more")
    return "\n".join(lines)


class OutputWriteError(LoHaDiffusionError, OSError):
    """A file could not be written: no space left on the device, or no permission. The message names the file,
    the space needed and free (or the folder) and the fix; the previous file is unchanged. Also an `OSError`
    (with the original `errno`)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NonFiniteError(LoHaDiffusionError, FloatingPointError):
    """Tensors or values that are NaN or infinite, or that overflow the dtype they are to be written in; the
    message names the modules and the fix. Also a `FloatingPointError`."""
