"""A route's side of the engine: submit a job (or several, all or none), then follow its records as a stream
(one submission's, or several merged) or wait for the last; whatever way a reader leaves early cancels what
it was reading.

Every generation endpoint goes through here, whatever shapes it answers with (app/outputs.py builds
those). HTTP errors for the engine's refusals and failures are decided here once: a full queue or a
shutdown is 503 with Retry-After, a failed pass 500.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import HTTPException, Request, status

from sedd_core.engine import (
    ChunkedWork,
    EngineClosed,
    EngineOutput,
    ErrorOutput,
    FinalOutput,
    QueueFull,
    StepOutput,
    Submission,
    WorkSubmission,
)
from sedd_core.sampling import Job

from .state import ServerState

QUEUE_FULL_RETRY_AFTER_S = 1
SHUTDOWN_RETRY_AFTER_S = 5
STEP_BACKLOG = 16  # step records a streaming reader may fall behind before it gets only the latest


def submit(state: ServerState, job: Job, stream_every: int | None) -> Submission:
    """`stream_every`: a step record every this many steps; None: none, only the final record."""
    every = job.steps + 1 if stream_every is None else stream_every  # a period past the last step makes none
    return _submitted(lambda: state.engine.submit(job, stream_every=every), state)


def submit_all(state: ServerState, jobs: list[Job], stream_every: int | None) -> list[Submission]:
    """One submission per job, all or none: a refused one cancels those submitted before it."""
    running: list[Submission] = []
    try:
        for job in jobs:
            running.append(submit(state, job, stream_every))
    except BaseException:
        cancel_unfinished(running)
        raise
    return running


def cancel_unfinished(running: list) -> None:
    """Cancel every submission not finished yet: its rows leave the batch before the next step."""
    for submission in running:
        if not submission.finished:
            submission.cancel()


def submit_work(state: ServerState, work: ChunkedWork, chunk_rows: int) -> WorkSubmission:
    """A work item (scoring) for the engine's device thread, refused as a job would be."""
    return _submitted(lambda: state.engine.submit_work(work, chunk_rows), state)


def _submitted(enqueue, state: ServerState):
    try:
        return enqueue()
    except QueueFull as exc:
        state.metrics.rejected()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"the server is busy: {exc}",
                            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}) from None
    except EngineClosed as exc:
        state.metrics.rejected()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc),
                            headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}) from None
    except ValueError as exc:  # more rows than one pass holds
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None


async def follow(submission: Submission) -> AsyncIterator[EngineOutput]:
    """The submission's records up to its final one; leaving early (client gone, shutdown) cancels it.

    A reader more than STEP_BACKLOG step records behind gets the latest step instead of the backlog;
    the final record is never dropped."""
    try:
        while True:
            records = await submission.next_outputs()
            steps = [record for record in records if isinstance(record, StepOutput)]
            for record in steps[-1:] if len(steps) > STEP_BACKLOG else steps:
                yield record
            final = next((record for record in records if not isinstance(record, StepOutput)), None)
            if final is not None:
                yield final
                return
    finally:
        cancel_unfinished([submission])


async def follow_all(running: list[Submission]) -> AsyncIterator[tuple[int, EngineOutput]]:
    """(index of the submission, record) of several submissions as their records arrive, up to the final
    record of each; leaving early cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, submission: Submission) -> None:
        async for record in follow(submission):
            await queue.put((i, record))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(running)]
    try:
        left = len(running)
        while left:
            i, record = await queue.get()
            yield i, record
            if not isinstance(record, StepOutput):
                left -= 1
    finally:
        for task in tasks:
            task.cancel()
        cancel_unfinished(running)


async def result(submission: Submission, request: Request) -> FinalOutput | None:
    """The final record; None when the client left first (the submission is then cancelled). A failed
    submission raises the HTTP error that says why."""
    records = await results([submission], request)
    return None if records is None else records[0]


def error_status(record: ErrorOutput) -> HTTPException:
    if record.outcome == "error":
        return HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail=record.message)
    # the server stopped before the request finished (or, never seen by a waiting reader, a cancellation)
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=record.message,
                         headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)})


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only http.disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def results(running: list, request: Request) -> list[EngineOutput] | None:
    """The final records of several submissions of one request (generation or scoring), in order; None
    when the client left first (all are then cancelled). The first failed one raises its HTTP error."""

    async def final(submission: Submission | WorkSubmission) -> EngineOutput:
        while True:
            records = [r for r in await submission.next_outputs() if not isinstance(r, StepOutput)]
            if records:
                return records[0]

    waiting = asyncio.ensure_future(asyncio.gather(*(final(s) for s in running)))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            return None
        records = waiting.result()
    finally:
        for task in (waiting, gone):
            task.cancel()
        cancel_unfinished(running)
    for record in records:
        if isinstance(record, ErrorOutput):
            raise error_status(record)
    return records
