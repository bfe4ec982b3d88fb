"""How torch's OpenMP threads wait between parallel regions in a server process.

OpenMP runtimes read their environment once, when torch loads them, so `openmp_wait_defaults()` runs
before torch is imported: at the top of app.main (the `uvicorn app.main:create_app` path) and first in
`sedd serve`. It imports nothing heavy.

The default is a short spin, then sleep: libgomp (torch's Linux wheels) spins GOMP_SPINCOUNT times,
about 20 us here, before a waiting thread sleeps. A pass's parallel regions follow each other within
microseconds, so its threads stay awake through it instead of each region paying a futex wake of the
sleeping thread (with OMP_WAIT_POLICY=PASSIVE, 70-100 us a region on a 2-core VM: a third of a one-row
pass); and between passes, or while another process holds the core, a waiting thread sleeps after 20 us
instead of spinning for libgomp's default of milliseconds, the collapse that a shared CPU showed.
docs/benchmarks.md, "CPU, round three", has the measurements on an idle and a busy machine.
KMP_BLOCKTIME=0 keeps LLVM's and Intel's OpenMP runtimes (which ignore GOMP_SPINCOUNT) sleeping at once,
as before. A user who set any of the three variables gets exactly what they set."""
from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SERVER_DEFAULTS = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}


def openmp_wait_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Sets SERVER_DEFAULTS in `environ` unless the user set one of WAIT_VARIABLES (even to ""); returns what
    it set."""
    if any(name in environ for name in WAIT_VARIABLES):
        return {}
    environ.update(SERVER_DEFAULTS)
    return dict(SERVER_DEFAULTS)
