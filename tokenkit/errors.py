"""Errors raised at tokenkit's boundaries.

Each message names the offending value, the file and the fix, on one line, so the CLI can print it as is.
"""

import pickle


class TokenkitError(Exception):
    """Base class: a user-facing error that the CLI prints on one line and exits with status 2."""


class ConfigError(TokenkitError):
    """A flag or config value that cannot work (K <= 1, a grid that does not divide the image size, ...)."""


class ImageError(TokenkitError):
    """An image that cannot be decoded or used (truncated, not an image, smaller than the grid, ...)."""


class SourceError(TokenkitError):
    """An image source (folder or tar shards) that cannot be listed or holds hostile / duplicate entries."""


class CodebookError(TokenkitError):
    """A codebook file that is missing, not a safetensors codebook, or does not match the model."""


class StoreError(TokenkitError):
    """A feature or token store that is incomplete, corrupted, of another format version, or of another job."""


class MissingDependencyError(TokenkitError):
    """An optional dependency (faiss) that is not installed."""


def load_failure(e: BaseException) -> str:
    """The reason a torch.load (weights_only=True) failed, in a few words: torch's weights-only refusal is a
    paragraph about its defaults whose first line says nothing about the file."""
    if isinstance(e, pickle.UnpicklingError):
        return "refused by weights-only loading: not a checkpoint, or it holds pickled Python objects"
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def require(checks) -> None:
    """Raise ConfigError for the first (flag, value, ok, what it must be) whose ok is false."""
    for flag, value, ok, want in checks:
        if not ok:
            raise ConfigError(f"{flag} {value}: must be {want}")


def job_size_checks(cfg) -> tuple:
    """require() entries for the sizes of a batch job's config (features, tokenize)."""
    return (
        ("--shard-size", cfg.shard_size, cfg.shard_size >= 1, ">= 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 1, ">= 1"),
        ("--workers", cfg.workers, cfg.workers >= 0, ">= 0"),
    )
