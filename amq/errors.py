"""Errors amq raises on purpose. Each maps to an exit code; the CLI prints one line, no traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GOAL_NOT_MET = 1
EXIT_USER_ERROR = 2


class AmqError(Exception):
    """Base class: a problem the user can fix. The message is one line that says what to do."""

    exit_code = EXIT_USER_ERROR


class ConfigError(AmqError):
    """The YAML config or a command-line override is invalid."""


class ModelError(AmqError):
    """The model file cannot be read, upgraded or quantized as asked."""


class DataError(AmqError):
    """Calibration or evaluation data does not match the model."""


class OutputError(AmqError):
    """An output cannot be written."""


class GoalNotMet(AmqError):
    """The work ran but the goal (e.g. an accuracy budget) was not reached."""

    exit_code = EXIT_GOAL_NOT_MET
