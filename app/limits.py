"""This server's limits on a generation request: the one check between the schemas (shape) and the
library (`make_job`: the model's length and vocabulary). It reads the request and never rewrites it."""
from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from .schemas import GenerationOptions, default_steps
from .settings import Settings


def requested_steps(body: GenerationOptions, settings: Settings) -> int:
    """The steps a request asks for: its own, or the server's default when it names none."""
    return body.steps if "steps" in body.model_fields_set else default_steps(settings.max_steps)


def check_limits(settings: Settings, *, steps: int, num_samples: int, steps_field: str = "steps",
                 samples_field: str = "num_samples") -> None:
    """422 naming every field over SEDD_MAX_STEPS / SEDD_MAX_SAMPLES. The field names are the request's
    own, for endpoints that call them otherwise."""
    errors = []
    if steps > settings.max_steps:
        errors.append((steps_field, steps,
                       f"must be at most {settings.max_steps} (this server's SEDD_MAX_STEPS), got {steps}"))
    if num_samples > settings.max_samples:
        errors.append((samples_field, num_samples,
                       f"must be at most {settings.max_samples} (this server's SEDD_MAX_SAMPLES), got {num_samples}"))
    if errors:
        raise RequestValidationError([{"loc": ("body", name), "msg": msg, "type": "less_than_equal", "input": value}
                                      for name, value, msg in errors])
