"""Errors that end a run with one clear paragraph instead of a traceback.

`fusionbench.train.main` catches `FusionbenchError`, prints its message and exits non-zero.
Messages say what is wrong and what to do about it.
"""


class FusionbenchError(Exception):
    """Base class: a problem the user can fix (data, config, training numerics)."""


class DatasetError(FusionbenchError):
    """Dataset files are missing, corrupt or inconsistent."""


class ConfigError(FusionbenchError):
    """The composed configuration cannot be built (unknown key, mismatched modalities, ...)."""


class TrainingError(FusionbenchError):
    """Training cannot continue (non-finite loss, diverging solver, ...)."""


def check_choices(node: str, choices: dict) -> None:
    """``{key: (value, allowed values)}`` of config node ``node``: a `ConfigError` naming the first value
    that is not allowed and the values that are."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{node}.{key}={value!r} is not one of {list(allowed)}.")
