"""`sedd train` under real torchrun processes on loopback (gloo, CPU): two ranks on one node and on two nodes
equal one rank, a run saved by two ranks resumes on one, SIGTERM saves one checkpoint and torchrun's restarts
resume from it, and the GPT-2 walk-through (tokenize, two ranks, resume on one, sample).

Slow: every launch starts Python and torch in each rank (about 10-20 s on a loaded 2-core machine)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sedd_cli.main import main
from sedd_core.training import load_train_config, train

pytestmark = pytest.mark.slow

TOY = "hello world! diffusion ok masked chars score ratios tiny dataset\n" * 60
LAUNCH_TIMEOUT = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", "SEDD_DEVICE": "cpu",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **extra})
    return env


def sedd_command() -> list[str]:
    """`--no-python sedd` as the docs say, where the console script sits beside this Python; else `-m sedd_cli`."""
    script = Path(sys.executable).parent / "sedd"
    return ["--no-python", str(script)] if script.is_file() else ["-m", "sedd_cli"]


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def rendezvous(nnodes: int, nproc: int, port: int, *more: str) -> list[str]:
    """torchrun with its c10d rendezvous on loopback."""
    return torchrun("--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                    "--rdzv-id", "sedd-test", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
                    *more)


def one_node(nproc: int = 2, *more: str, static: bool = False) -> list[str]:
    if static:  # torchrun's static rendezvous: rank 0's address and port
        return torchrun("--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                        "--master-port", str(free_port()), *more)
    return rendezvous(1, nproc, free_port(), *more)


def run_launch(cmd: list[str], **env: str) -> str:
    proc = subprocess.run(cmd, env=rank_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def train_args(corpus: Path, run: Path, n_iters: int, *more: str) -> list[str]:
    return ["train", "--config", "tiny", "--data", str(corpus), "--out", str(run), "--no-progress", "--device", "cpu",
            "--set", "model.dropout=0", "--set", f"training.n_iters={n_iters}", "--set", "training.eval_every=5",
            "--set", "training.checkpoint_every=5", "--set", "training.snapshot_every=10", *more]


def meta(run: Path) -> dict:
    return torch.load(run / "checkpoints-meta" / "checkpoint.pth", map_location="cpu", weights_only=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def digest(state: dict) -> str:
    """sha256 of the parameters (the state dict less the rotary buffer) and the EMA, in model order."""
    h = hashlib.sha256()
    params = [v for k, v in state["model"].items() if k != "rotary_emb.inv_freq"]
    for tensor in [*params, *state["ema"]["shadow_params"]]:
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_close_states(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    path.write_text(TOY)
    return path


def test_two_ranks_on_two_nodes_and_on_one_equal_one_rank_and_a_two_rank_run_resumes_on_one(corpus, tmp_path):
    # the reference: 20 steps on one rank, at the same global batch (8), dropout off
    ref = tmp_path / "one-rank"
    cfg = load_train_config("tiny", [f"data.train=[{corpus}]", "model.dropout=0", "training.n_iters=20",
                                     "training.eval_every=5", "training.checkpoint_every=5",
                                     "training.snapshot_every=10"])
    train(cfg, ref, progress=False, device="cpu")

    # steps 0-10 on two nodes of one rank each, through torchrun's c10d rendezvous on loopback
    run = tmp_path / "two-ranks"
    port = free_port()
    node_cmd = rendezvous(2, 1, port, *sedd_command(), *train_args(corpus, run, 10))
    nodes = [subprocess.Popen(node_cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = []
    for node in nodes:
        out, _ = node.communicate(timeout=LAUNCH_TIMEOUT)
        outputs.append(out)
        assert node.returncode == 0, out[-6000:]
    both = "\n".join(outputs)
    first = next(line for line in both.splitlines() if line.startswith("sedd train:"))
    assert first.startswith("sedd train: world_size=2 (rank 0, gloo)")
    assert both.count("step       5 | train") == 1  # only rank 0 logs and writes
    assert [m["step"] for m in metrics(run)] == [5, 10] and all(m["world_size"] == 2 for m in metrics(run))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = meta(run)
    # every rank's digest of its weights and EMA, equal, and equal to what rank 0 saved
    assert state["world_size"] == 2 and state["replica_digests"] == [digest(state)] * 2
    on_one = tmp_path / "resumed-on-one"
    shutil.copytree(run, on_one)

    # steps 10-20 on one node of two ranks
    out = run_launch(one_node(2, *sedd_command(), *train_args(corpus, run, 20, "--resume")))
    assert f"resumed {run} at step 10 (saved by 2 rank(s))" in out
    reference = meta(ref)
    two = meta(run)
    assert two["replica_digests"] == [digest(two)] * 2
    assert_close_states(two, reference)
    ref_metrics, two_metrics = metrics(ref), metrics(run)
    assert [m["step"] for m in two_metrics] == [5, 10, 15, 20]
    for key in ("train_loss", "valid_loss", "grad_norm"):  # the loss after 20 steps, to float tolerance
        assert [m[key] for m in two_metrics] == pytest.approx([m[key] for m in ref_metrics], rel=1e-4)

    # the state two ranks saved at step 10 resumes on one rank and matches the uninterrupted run
    cfg20 = load_train_config(on_one / "train_config.yaml", ["training.n_iters=20"])
    train(cfg20, on_one, resume=True, progress=False, device="cpu")
    assert_close_states(meta(on_one), reference)
    assert [m["train_loss"] for m in metrics(on_one)] == pytest.approx([m["train_loss"] for m in ref_metrics],
                                                                       rel=1e-4)


def wait_for(log: Path, text: str, proc: subprocess.Popen, after: int = 0, timeout: float = LAUNCH_TIMEOUT) -> int:
    """Wait until `text` appears in the log past offset `after`; returns where it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        at = content.find(text, after)
        if at >= 0:
            return at + len(text)
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited with {proc.returncode} before {text!r}:\n{content[-6000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{log.read_text(errors='replace')[-6000:]}")


def worker_pids(agent: int) -> list[int]:
    """torchrun's worker processes (its children, from /proc)."""
    children = []
    for task in Path(f"/proc/{agent}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (from /proc: its children and their environment)."""
    children = worker_pids(agent)
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.parametrize("static", [False, True], ids=["c10d-rendezvous", "static-rendezvous"])
def test_sigterm_saves_one_checkpoint_and_torchrun_restarts_resume_from_it(corpus, tmp_path, static):
    if not Path("/proc/self/task").is_dir():
        pytest.fail("this test finds torchrun's workers through /proc (Linux)")
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    args = ["train", "--config", "tiny", "--data", str(corpus), "--out", str(run), "--no-progress", "--device", "cpu",
            "--resume", "--set", "training.n_iters=100000", "--set", "training.eval_every=2",
            "--set", "training.checkpoint_every=100000", "--set", "training.snapshot_every=0", "--set", "track=none"]
    with open(log, "w") as fh:
        agent = subprocess.Popen(one_node(2, "--max-restarts", "1", *sedd_command(), *args, static=static),
                                 env=rank_env(),
                                 stdout=fh, stderr=subprocess.STDOUT)
    try:
        at = wait_for(log, "step       4 |", agent)
        os.kill(worker_of_rank(agent.pid, 1), signal.SIGTERM)  # one rank signalled: every rank stops with it
        at = wait_for(log, "(SIGTERM); continue with", agent, at)
        content = log.read_text()
        stopped = int(content[:at].rsplit("stopped at step ", 1)[1].split(" ")[0].replace(",", ""))
        # the ranks exited with 128 + SIGTERM; torchrun restarted them, and `--resume` picked up the checkpoint
        at = wait_for(log, f"resumed {run} at step {stopped:,} (saved by 2 rank(s))", agent, at)
        target = (stopped // 2 + 2) * 2  # the second evaluation (every 2 steps) after the restart
        at = wait_for(log, f"step {target:>7,} |", agent, at)
        agent.send_signal(signal.SIGTERM)  # the job itself: torchrun passes it to every rank
        agent.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        if agent.poll() is None:  # a failed test: end torchrun and its ranks, leaving no process behind
            workers = worker_pids(agent.pid)
            agent.kill()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    content = log.read_text()
    tail = content[-6000:]  # every assertion below shows torchrun's log when it fails
    assert agent.returncode != 0, tail
    assert "stopped at step " in content[at:], tail
    second = int(content[at:].rsplit("stopped at step ", 1)[1].split(" ")[0].replace(",", ""))
    assert second >= target and meta(run)["step"] == second, tail
    assert "(exitcode: 143)" in content, tail  # the ranks stopped by the first signal exited with 128 + SIGTERM
    assert content.count("resumed ") == 1, tail  # no restart after the second signal: it was the job's
    assert "forcefully exiting" not in content, tail  # every rank exited on its own, within the grace period
    steps = [m["step"] for m in metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] <= second, tail  # one writer, nothing past the checkpoint


def test_gpt2_walk_through_tokenize_two_ranks_resume_on_one_then_sample(tmp_path, gpt2_vocab, monkeypatch, capsys):
    """The done-when run of issue 22: tokenize a small corpus, train a few steps on two ranks, resume on one,
    and `sedd sample --model RUN` gives text."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}. The quick brown fox jumps over the lazy dog. " * 8)
    tokens = tmp_path / "tokens"
    monkeypatch.setenv("SEDD_GPT2_VOCAB", str(gpt2_vocab))
    assert main(["data", "tokenize", str(corpus), "--out", str(tokens), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["documents"] == 20

    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--data", str(tokens), "--out", str(run), "--no-progress", "--device", "cpu",
            "--set", "tokenizer=gpt2", "--set", "training.eval_every=2", "--set", "training.checkpoint_every=2",
            "--set", "training.snapshot_every=4"]
    out = run_launch(one_node(2, *sedd_command(), *args, "--set", "training.n_iters=4"),
                     SEDD_GPT2_VOCAB=str(gpt2_vocab))
    assert "world_size=2" in out and "memory-mapped from" in out
    assert meta(run)["step"] == 4 and (run / "gpt2.tiktoken").is_file()

    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--device", "cpu",
                 "--set", "training.n_iters=6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["world_size"] == 1
    assert [m["world_size"] for m in metrics(run)] == [2, 2, 1]

    monkeypatch.delenv("SEDD_GPT2_VOCAB")  # the run folder carries its vocabulary
    assert main(["sample", "--model", str(run), "--num-samples", "2", "--steps", "8", "--seed", "0", "--json",
                 "--device", "cpu"]) == 0
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(samples) == 2 and all(isinstance(s["text"], str) and s["text"] for s in samples)
