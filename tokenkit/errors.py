"""Errors raised at tokenkit's boundaries.

Each message names the offending value, the file and the fix, on one line, so the CLI can print it as is.
"""

import math
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


class DivergedError(TokenkitError):
    """A training loss that became NaN or infinite: the run stops before a checkpoint could keep it."""


class MissingDependencyError(TokenkitError):
    """An optional dependency (faiss) that is not installed."""


def load_failure(e: BaseException) -> str:
    """The reason a torch.load (weights_only=True) failed, in a few words: torch's weights-only refusal is a
    paragraph about its defaults whose first line says nothing about the file."""
    if isinstance(e, pickle.UnpicklingError):
        return "refused by weights-only loading: not a checkpoint, or it holds pickled Python objects"
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


# bounds every size flag shares: far beyond any real use, far below what would exhaust memory or overflow
MAX_BATCH = 2**16  # images per rank and step
MAX_WORKERS = 1024
MAX_SEED = 2**63 - 1
MAX_SIDE = 8192  # pixels


def finite(value) -> bool:
    """False for a NaN or infinite float, alone or in a tuple; True for anything else."""
    if isinstance(value, (tuple, list)):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def require(checks) -> None:
    """Raise ConfigError for the first (flag, value, ok, what it must be) whose value is not finite or whose
    ok is false."""
    for flag, value, ok, want in checks:
        if not finite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number, {want}")
        if not ok:
            raise ConfigError(f"{flag} {value}: must be {want}")


def job_size_checks(cfg) -> tuple:
    """require() entries for the sizes of a batch job's config (features, tokenize)."""
    return (
        ("--shard-size", cfg.shard_size, 1 <= cfg.shard_size <= 2**20, "in [1, 2^20]"),
        ("--batch-size", cfg.batch_size, 1 <= cfg.batch_size <= MAX_BATCH, f"in [1, {MAX_BATCH}]"),
        ("--workers", cfg.workers, 0 <= cfg.workers <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
    )


def seed_check(seed) -> tuple:
    """The require() entry of a --seed: numpy's and torch's seeds are unsigned 64-bit."""
    return ("--seed", seed, 0 <= seed <= MAX_SEED, "in [0, 2^63 - 1]")
