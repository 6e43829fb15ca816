"""Error types. Every error a user can cause derives from `QLoraLiteError` and says what to fix."""

from __future__ import annotations

__all__ = ["QLoraLiteError", "ConfigError", "CheckpointError", "DataError", "TrainingError", "MergeError",
           "MergeOverflowError", "VerificationError"]


class QLoraLiteError(Exception):
    """Base class: the message is meant for the user, one line of cause plus the fix."""


class ConfigError(QLoraLiteError, ValueError):
    """Invalid configuration; lists every problem at once."""

    def __init__(self, problems: list[str] | str, what: str = "configuration"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        bullet = "\n  - "
        super().__init__(f"invalid {what}:{bullet}" + bullet.join(self.problems))


class CheckpointError(QLoraLiteError, ValueError):
    """A model/adapter/checkpoint file is missing, corrupt or does not fit."""


class DataError(QLoraLiteError, ValueError):
    """A data set is empty or malformed (messages name file and line)."""


class TrainingError(QLoraLiteError, RuntimeError):
    """Training cannot continue (non-finite loss, ...)."""


class MergeError(QLoraLiteError, RuntimeError):
    """The merge cannot produce a correct checkpoint (non-finite values, refused in-memory merge)."""


class MergeOverflowError(MergeError, OverflowError):
    """A merged value does not fit the output dtype (float16 tops out at ±65504)."""


class VerificationError(MergeError):
    """The merged checkpoint's logits disagree with the base + adapter model beyond the thresholds."""
