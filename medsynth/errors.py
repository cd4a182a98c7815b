"""The exceptions medsynth raises for user mistakes.

Library code raises these; only :mod:`medsynth.cli` turns them into a message and an exit code.
"""

from __future__ import annotations


class MedsynthError(Exception):
    """A problem the user can fix (bad data, bad config, bad arguments). Never a bug."""


class DataError(MedsynthError):
    """A dataset, manifest or volume that cannot be used as it is."""


class ConfigError(MedsynthError):
    """A recipe or option that is invalid."""


class CheckpointError(MedsynthError):
    """A checkpoint or run folder that cannot be loaded safely."""


class JobError(MedsynthError):
    """A job that cannot start or continue (output folder clashes, resume mismatch)."""


class QualityControlError(JobError):
    """No draw of a synthetic pair passed quality control (``qc.max_tries`` attempts)."""
