"""Errors that genrecal reports to the user as one clear line (standard library only)."""

from __future__ import annotations


class GenrecalError(Exception):
    """A problem the user can fix; the CLI prints it as one red line and exits with code 1."""


class RecipeError(GenrecalError):
    """A recipe that cannot be read or does not validate; carries every problem found."""

    def __init__(self, path: str, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  • {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{self.path}: {n} problem{'s' if n != 1 else ''} in the recipe\n{lines}")


class ModelLoadError(GenrecalError):
    """A model or processor that cannot be loaded from the given path or hub id."""


class DataError(GenrecalError):
    """A data source that cannot be read or lacks what the recipe asks for."""


class PeerStopped(GenrecalError):
    """This process stops because another process met an error and prints it: the CLI exits 1
    without a line of its own, so that the message appears once."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
