"""Errors a user can cause. The CLI and the server print them as one line, never a traceback."""

from __future__ import annotations


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
