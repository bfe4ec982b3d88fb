"""The continuous-batching engine (sedd_core.engine) without HTTP, on the trained tiny-five model.

Each test drives an Engine from asyncio and watches it through an EngineObserver and the
engine's `fault_injector` hook (called from the worker thread with the jobs of every pass,
before the pass runs).
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import sedd_core
from sedd_core.engine import Engine, EngineClosed, ErrorOutput, FinalOutput, QueueFull, StepOutput, Submission
from sedd_core.generation import decode_rows, generate, make_job

pytestmark = pytest.mark.timeout(120)




class Recorder:
    """EngineObserver that keeps what it is told (called from the worker thread)."""

    def __init__(self):
        self.rows_per_pass: list[int] = []
        self.outcomes: list[str] = []

    def on_pass(self, rows: int, seconds: float, positions: int) -> None:
        self.rows_per_pass.append(rows)

    def on_request_end(self, outcome: str, samples: int, tokens: int, seconds: float) -> None:
        self.outcomes.append(outcome)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # One intra-op thread, as the server runs on a small CPU host: with two, a shared 2-core machine
    # makes every tiny pass wait on a busy core (tens of ms instead of a few).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def events_of(submission: Submission) -> list:
    """Every record of a submission, up to and including its final one."""
    records = []
    while not records or isinstance(records[-1], StepOutput):
        records += await submission.next_outputs()
    assert all(record.request_id == submission.id for record in records)
    return records


def texts(lm, events: list) -> list[str]:
    assert isinstance(events[-1], FinalOutput), events[-1]
    return decode_rows(lm, events[-1].tokens)


def tokens(events: list) -> list[list[int]]:
    assert isinstance(events[-1], FinalOutput), events[-1]
    return events[-1].tokens.tolist()


def test_different_requests_share_passes(lm):
    """Other steps, predictors, sample counts and infill constraints ride in the same passes."""
    recorder = Recorder()

    async def scenario():
        engine = Engine(lm, max_rows=16, observer=recorder).start()
        try:
            jobs = [
                make_job(lm, num_samples=1, steps=24, predictor="analytic", seed=1),
                make_job(lm, num_samples=3, steps=16, predictor="euler", seed=2),
                make_job(lm, num_samples=2, steps=20, seed=3, prefix="di", suffix="ok"),
                make_job(lm, num_samples=1, steps=12, length=6, seed=4),  # another length: its own passes
            ]
            requests = [engine.submit(job, stream_every=4) for job in jobs]
            return await asyncio.gather(*(events_of(r) for r in requests))
        finally:
            engine.stop()

    plain, euler, infill, short = run(scenario())
    assert len(texts(lm, plain)) == 1 and len(texts(lm, euler)) == 3
    assert all(len(text) == 12 for text in texts(lm, plain) + texts(lm, euler))
    assert all(t.startswith("di") and t.endswith("ok") for t in texts(lm, infill)), texts(lm, infill)
    assert [len(t) for t in texts(lm, short)] == [6]
    # The three length-12 requests (1 + 3 + 2 rows) shared passes; the length-6 one never joined them.
    assert max(recorder.rows_per_pass) == 6, recorder.rows_per_pass
    assert recorder.outcomes.count("ok") == 4


def test_seeded_request_alone_equals_beside_others(lm):
    """A row's result depends on its own generator only, not on who shares the pass."""
    recorder = Recorder()

    async def scenario():
        engine = Engine(lm, max_rows=16, observer=recorder).start()
        try:
            alone = await events_of(engine.submit(make_job(lm, num_samples=2, steps=32, seed=1234)))
            others = [make_job(lm, num_samples=3, steps=40, seed=7), make_job(lm, steps=24, predictor="euler"),
                      make_job(lm, num_samples=2, steps=32, seed=8, prefix="h")]
            requests = [engine.submit(job) for job in others[:2]]
            target = engine.submit(make_job(lm, num_samples=2, steps=32, seed=1234))
            requests.append(engine.submit(others[2]))
            beside, *_ = await asyncio.gather(events_of(target), *(events_of(r) for r in requests))
            return alone, beside
        finally:
            engine.stop()

    alone, beside = run(scenario())
    assert max(recorder.rows_per_pass) > 2  # the second run really was batched
    assert tokens(beside) == tokens(alone)
    # ... and the library's one-request loop draws the same samples.
    assert texts(lm, alone) == generate(lm, num_samples=2, steps=32, seed=1234)


def test_cancelled_request_leaves_before_the_next_step(lm):
    recorder = Recorder()
    passes: list[list[int]] = []
    in_flight, release = threading.Event(), threading.Event()
    victim_job = make_job(lm, steps=400, seed=5)
    other_job = make_job(lm, num_samples=2, steps=30, seed=6)

    def injector(jobs):
        passes.append([id(job) for job in jobs])
        if any(job is victim_job for job in jobs) and victim_job.step_index == 5 and not release.is_set():
            in_flight.set()  # the victim's 6th step is in this pass; hold it until the test cancels
            release.wait(10)

    async def scenario():
        engine = Engine(lm, max_rows=8, observer=recorder)
        engine.fault_injector = injector
        engine.start()
        try:
            victim = engine.submit(victim_job)
            other = engine.submit(other_job)
            assert await asyncio.to_thread(in_flight.wait, 10)
            held_pass = len(passes) - 1
            victim.cancel()
            release.set()
            other_events = await events_of(other)
            for _ in range(100):
                if engine.running_rows == 0:
                    break
                await asyncio.sleep(0.02)
            return held_pass, other_events, engine.running_rows
        finally:
            engine.stop()

    held_pass, other_events, rows_left = run(scenario())
    later = [job_ids for job_ids in passes[held_pass + 1:]]
    assert later, "the other request kept running after the cancellation"
    assert all(id(victim_job) not in job_ids for job_ids in later)
    assert victim_job.step_index == 6  # the pass in flight finished; no step after it
    assert isinstance(other_events[-1], FinalOutput)
    assert sorted(recorder.outcomes) == ["cancelled", "ok"]
    assert rows_left == 0


def test_failure_in_a_pass_fails_only_that_pass(lm):
    """An exception in one pass sends `error` to that pass's requests; others and later ones succeed."""
    recorder = Recorder()
    doomed = make_job(lm, steps=40, seed=1)
    pass_mate = make_job(lm, num_samples=2, steps=40, seed=2)  # same length: same pass as `doomed`
    elsewhere = make_job(lm, steps=40, length=8, seed=3)  # another length: another pass

    def injector(jobs):
        if any(job is doomed for job in jobs) and doomed.step_index == 3:
            raise RuntimeError("injected fault")

    async def scenario():
        engine = Engine(lm, max_rows=8, observer=recorder)
        engine.fault_injector = injector
        engine.start()
        try:
            requests = [engine.submit(job) for job in (doomed, pass_mate, elsewhere)]
            first = await asyncio.gather(*(events_of(r) for r in requests))
            later = await events_of(engine.submit(make_job(lm, num_samples=2, steps=16, seed=4)))
            return first, later
        finally:
            engine.stop()

    (doomed_events, mate_events, elsewhere_events), later = run(scenario())
    for events in (doomed_events, mate_events):
        assert isinstance(events[-1], ErrorOutput) and events[-1].outcome == "error"
        assert "injected fault" in events[-1].message
        assert [e.step for e in events[:-1]] == [1, 2, 3]
    assert isinstance(elsewhere_events[-1], FinalOutput)
    assert isinstance(later[-1], FinalOutput) and len(tokens(later)) == 2
    assert sorted(recorder.outcomes) == ["error", "error", "ok", "ok"]


def test_out_of_memory_retries_request_by_request(lm):
    """A CUDA OOM on a shared pass is retried one request at a time, and everyone finishes."""
    recorder = Recorder()
    oom_passes = []

    def injector(jobs):
        if len(jobs) > 1:
            oom_passes.append(len(jobs))
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")

    specs = [{"num_samples": 2, "steps": 12, "seed": 11},
             {"num_samples": 1, "steps": 16, "seed": 12, "predictor": "euler"},
             {"num_samples": 1, "steps": 10, "seed": 13, "prefix": "di"}]

    async def scenario():
        engine = Engine(lm, max_rows=8, observer=recorder)
        engine.fault_injector = injector
        engine.start()
        try:
            requests = [engine.submit(make_job(lm, **spec), stream_every=100) for spec in specs]
            return await asyncio.gather(*(events_of(r) for r in requests))
        finally:
            engine.stop()

    results = run(scenario())
    assert oom_passes, "no pass held more than one request"
    assert set(recorder.rows_per_pass) <= {1, 2}  # only the one-request retries ran
    for spec, events in zip(specs, results):
        assert texts(lm, events) == generate(lm, **spec)
    assert recorder.outcomes == ["ok", "ok", "ok"]


def test_queue_full_at_the_limit(lm):
    async def scenario():
        engine = Engine(lm, max_rows=2, max_queue=2)  # never started: nothing leaves the queue
        waiting = [engine.submit(make_job(lm, steps=4)), engine.submit(make_job(lm, steps=4))]
        assert engine.queue_depth == 2
        with pytest.raises(QueueFull, match="waiting"):
            engine.submit(make_job(lm, steps=4))
        with pytest.raises(ValueError, match="at most 2 samples"):
            engine.submit(make_job(lm, num_samples=3, steps=4))
        engine.stop()  # fails what still waits
        return await asyncio.gather(*(events_of(r) for r in waiting))

    for events in run(scenario()):
        assert isinstance(events[-1], ErrorOutput) and events[-1].outcome == "shutdown"
        assert "shut down" in events[-1].message


def test_drain_stops_admitting_and_finishes_in_flight(lm):
    recorder = Recorder()

    async def scenario():
        engine = Engine(lm, max_rows=8, observer=recorder).start()
        running = [engine.submit(make_job(lm, steps=40, seed=1)), engine.submit(make_job(lm, steps=60, seed=2))]
        drain = asyncio.create_task(engine.drain(timeout=60))
        await asyncio.sleep(0)  # drain has begun: the engine is closing
        assert not engine.accepting
        with pytest.raises(EngineClosed):
            engine.submit(make_job(lm, steps=4))
        results = await asyncio.gather(*(events_of(r) for r in running))
        await drain
        return results

    for events in run(scenario()):
        assert isinstance(events[-1], FinalOutput)
    assert recorder.outcomes == ["ok", "ok"]


def test_drain_timeout_fails_what_is_left(lm):
    recorder = Recorder()

    async def scenario():
        engine = Engine(lm, max_rows=8, observer=recorder).start()
        endless = engine.submit(make_job(lm, steps=100_000, seed=1), stream_every=1000)
        await engine.drain(timeout=0.2)
        return await events_of(endless)

    events = run(scenario())
    assert isinstance(events[-1], ErrorOutput) and events[-1].outcome == "shutdown"
    assert "shut down" in events[-1].message
    assert recorder.outcomes == ["shutdown"]


def test_records_carry_token_rows_and_masks_left(lm):
    """Step records hold the canvas on the CPU and, per row, the masked positions left after that step:
    exactly the masks in its tokens, never growing, none at the end; the final record's tokens are the
    library's result for the same seed."""

    async def scenario():
        engine = Engine(lm, max_rows=8).start()
        try:
            infill = engine.submit(make_job(lm, num_samples=2, steps=10, seed=21, prefix="di", suffix="ok"))
            plain = engine.submit(make_job(lm, num_samples=3, steps=6, seed=22), stream_every=2)
            return await asyncio.gather(events_of(infill), events_of(plain))
        finally:
            engine.stop()

    infill, plain = run(scenario())
    for records, steps, every in ((infill, 10, 1), (plain, 6, 2)):
        *step_records, final = records
        assert [r.step for r in step_records] == list(range(every, steps + 1, every))
        assert all(r.steps == steps for r in step_records)
        assert [r.t for r in step_records] == sorted((r.t for r in step_records), reverse=True)
        for record in step_records:
            assert record.tokens.device.type == "cpu"
            assert list(record.masks_left) == (record.tokens == lm.mask_id).sum(dim=1).tolist()
        lefts = [r.masks_left for r in step_records]
        assert all(all(a >= b for a, b in zip(earlier, later)) for earlier, later in zip(lefts, lefts[1:]))
        assert isinstance(final, FinalOutput) and not (final.tokens == lm.mask_id).any()
        assert final.timing.total_s >= final.timing.run_s >= 0 and final.timing.queued_s >= 0
    assert sum(step_records[0].masks_left) > 0  # the first steps still had masks to report
    assert decode_rows(lm, infill[-1].tokens) == generate(lm, num_samples=2, steps=10, seed=21, prefix="di",
                                                          suffix="ok")


def test_uniform_graph_reports_no_masks(tmp_path, tiny_config, write_oxen_folder):
    folder = write_oxen_folder(tmp_path / "uniform", tiny_config(tokens=98, graph="uniform", length=8))
    uniform = sedd_core.load(str(folder), device="cpu")

    async def scenario():
        engine = Engine(uniform, max_rows=4).start()
        try:
            return await events_of(engine.submit(make_job(uniform, num_samples=2, steps=3, seed=1)))
        finally:
            engine.stop()

    *step_records, final = run(scenario())
    assert [r.masks_left for r in step_records] == [(0, 0)] * 3
    assert isinstance(final, FinalOutput) and final.tokens.shape == (2, 8)


def test_a_cancelled_submission_ends_with_a_cancelled_record(lm):
    async def scenario():
        engine = Engine(lm, max_rows=1)  # not started yet: the submission waits
        waiting = engine.submit(make_job(lm, steps=4))
        waiting.cancel()
        engine.start()
        try:
            return await events_of(waiting)
        finally:
            engine.stop()

    records = run(scenario())
    assert len(records) == 1 and isinstance(records[0], ErrorOutput) and records[0].outcome == "cancelled"
