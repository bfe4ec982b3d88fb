"""The one error of a training run that cannot start or go on."""


class TrainingError(ValueError):
    """Training cannot start or go on; the message says why and what to do."""
