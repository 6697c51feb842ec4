"""Errors a user can cause. The CLI and the server print them as one line, never a traceback."""

from __future__ import annotations

# The name on the package index: "imagegen" there is an unrelated project. The import name stays `imagegen`.
DISTRIBUTION = "imagegen-mlx"


def install_hint(extra: str) -> str:
    """How to install an optional extra, by name and from a checkout (where `imagegen-mlx[...]` would fetch a
    second copy from the index)."""
    return f'pip install "{DISTRIBUTION}[{extra}]" (from a checkout: pip install -e ".[{extra}]")'


class ImagegenError(Exception):
    """Base of every error caused by input (names, files, options) rather than by a bug."""


class UnknownModelError(ImagegenError, KeyError):
    def __init__(self, name: str, suggestions: list[str]):
        self.name, self.suggestions = name, suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"Unknown model '{name}'.{hint} Run `imagegen models` to list them.")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class WeightsNotFoundError(ImagegenError, FileNotFoundError):
    """No weights where we looked; the message says where and how to get them."""


class WeightsError(ImagegenError):
    """Weights exist but are unusable: missing or unexpected keys, wrong shapes, corrupt files."""


class InvalidOptionError(ImagegenError, ValueError):
    """A generation option has a bad value, or the model does not support it."""


class InvalidImageError(ImagegenError, ValueError):
    """An input image cannot be read or used."""


class LoraError(ImagegenError, ValueError):
    """An adapter file cannot be used: unreadable, keys the model does not know, no matching layer, wrong shapes."""
