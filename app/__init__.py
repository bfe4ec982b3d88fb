"""The HTTP server for SEDD models: validation, routing, streaming and settings over `sedd_core`.

`create_app` in `app.main` builds the FastAPI application; `sedd serve` runs it under uvicorn.
"""
import os

# Idle OpenMP threads sleep instead of spinning. With torch's pool on every core, a spinning thread holds a
# core that a preempted team member (or the event loop) needs; on a shared CPU a pass then waits whole
# scheduler slices (docs/benchmarks.md, "CPU, round two"). Read when torch loads libgomp, so it has to be set
# before torch is imported: here for `uvicorn app.main:create_app`; `make serve` and the CPU image set it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
