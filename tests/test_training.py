"""`sedd train`: run folder layout, loss, exact resume, CLI, config overrides, Oxen push."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

import sedd_core
from sedd_cli.main import main
from sedd_cli.train import stop_on_signals
from sedd_core.tokenizers import DEFAULT_CHARS
from sedd_core.training import TrainConfig, load_train_config, train
from sedd_core.training import trainer as trainer_mod
from sedd_core.training.config import TrainConfigError, apply_overrides
from sedd_core.training.oxen_push import OxenPusher, OxenPushError

TOY = ("hello world! diffusion ok masked chars score ratios tiny dataset\n" * 60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    path.write_text(TOY)
    return path


def tiny(corpus: Path, **training) -> TrainConfig:
    """The packaged tiny config on the toy corpus, without snapshots unless asked."""
    overrides = [f"data.train=[{corpus}]", "training.snapshot_every=0", "training.eval_every=0",
                 "training.checkpoint_every=0"]
    overrides += [f"training.{k}={v}" for k, v in training.items()]
    return load_train_config("tiny", overrides)


def meta(run: Path) -> dict:
    return torch.load(run / "checkpoints-meta" / "checkpoint.pth", map_location="cpu", weights_only=True)


# ---- a run folder is a model -------------------------------------------------------------------


def test_tiny_run_writes_a_loadable_model_folder(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny(corpus, n_iters=6, eval_every=3, snapshot_every=6, checkpoint_every=3, export_dtype="float16")
    result = train(cfg, run, progress=False)
    assert result["step"] == 6 and result["status"] == "finished"
    assert math.isfinite(result["valid_loss"]) and result["valid_bpc"] == pytest.approx(
        result["valid_loss"] / math.log(2))

    for name in ("checkpoint.pth", "config.yaml", "tokenizer_config.json", "train_config.yaml", "metrics.jsonl",
                 "checkpoints-meta/checkpoint.pth", "samples/step_0000006.txt"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.tmp")), "temporary files left behind"

    exported = torch.load(run / "checkpoint.pth", weights_only=True)
    assert exported["vocab_embed.embedding"].dtype == torch.float16
    assert exported["rotary_emb.inv_freq"].dtype == torch.float32  # buffers stay exact
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["tokens"] == 98 and config["tokenizer"] == "char" and config["model"]["hidden_size"] == 32
    assert json.loads((run / "tokenizer_config.json").read_text())["model_max_length"] == 24

    state = meta(run)  # readable with weights_only=True
    assert state["step"] == 6 and set(state["ema"]) == {"decay", "num_updates", "shadow_params"}
    assert state["ema"]["num_updates"] == 6
    assert state["train_config"]["training"]["n_iters"] == 6
    assert {"torch", "data_generator"} <= set(state["rng"])
    # the exported weights are the EMA weights, in model.parameters() order
    names = [k for k in state["model"] if k != "rotary_emb.inv_freq"]
    assert torch.equal(exported[names[0]], state["ema"]["shadow_params"][0].half())

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6]
    assert set(metrics[0]) >= {"step", "train_loss", "valid_loss", "valid_bpc", "tokens_per_s", "elapsed_s"}
    assert "=== infill" in (run / "samples/step_0000006.txt").read_text()

    lm = sedd_core.load(run)
    assert lm.tokenizer.name == "char" and lm.length == 24
    texts = sedd_core.generate(lm, num_samples=2, steps=8, seed=0)
    # six steps of training leave every token, [PAD] (decodes to nothing) and [UNK] (U+FFFD) too, some probability
    assert len(texts) == 2 and all(len(t) <= 24 and set(t) <= set(DEFAULT_CHARS) | {"\ufffd"} for t in texts)
    infill = sedd_core.generate(lm, num_samples=1, steps=8, seed=0, prefix="hello", suffix="ok")[0]
    assert infill.startswith("hello") and infill.endswith("ok")


def test_loss_goes_down(tmp_path):
    text = tmp_path / "hello.txt"
    text.write_text("hello world! " * 300)
    cfg = load_train_config("tiny", [f"data.train=[{text}]", "training.n_iters=60", "training.eval_every=10",
                                     "training.lr=3e-3", "training.warmup=5", "training.snapshot_every=0",
                                     "training.checkpoint_every=0", "model.dropout=0"])
    train(cfg, tmp_path / "run", progress=False, device="cpu")  # fixed seed
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    first_train = metrics[0]["train_loss"]
    last_train = (metrics[-1]["train_loss"] + metrics[-2]["train_loss"]) / 2
    assert last_train < 0.75 * first_train
    assert metrics[-1]["valid_loss"] < 0.8 * metrics[0]["valid_loss"]
    assert metrics[-1]["valid_bpc"] < math.log2(96) - 2  # well below a uniform guess over the characters


# ---- resume is exact -----------------------------------------------------------------------------


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] and a["ema"]["decay"] == b["ema"]["decay"]
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        for name, value in oa["state"][idx].items():
            assert torch.equal(value, ob["state"][idx][name]), (idx, name)
    for key in ("torch", "data_generator", "noise_generator"):
        assert torch.equal(a["rng"][key], b["rng"][key]), key


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(corpus, n_iters=8, snapshot_every=4, eval_every=4), run, progress=False, device="cpu")
    return meta(run)


def test_resume_with_more_iterations_equals_an_uninterrupted_run(corpus, tmp_path, straight_run):
    run = tmp_path / "run"
    first = train(tiny(corpus, n_iters=5, snapshot_every=4, eval_every=4), run, progress=False, device="cpu")
    assert first["step"] == 5
    with pytest.raises(trainer_mod.TrainingError, match="--resume"):
        train(tiny(corpus, n_iters=8), run, progress=False)
    second = train(tiny(corpus, n_iters=8, snapshot_every=4, eval_every=4), run, resume=True, progress=False,
                   device="cpu")
    assert second["step"] == 8
    assert_same_state(meta(run), straight_run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 8]


def test_sigterm_and_ctrl_c_mid_step_stop_with_a_checkpoint_and_resume_exactly(corpus, tmp_path, straight_run,
                                                                               monkeypatch):
    run = tmp_path / "run"
    cfg = tiny(corpus, n_iters=8, snapshot_every=4, eval_every=4)
    original = trainer_mod.Trainer.train_step

    def sigterm_at_3(self):
        loss = original(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", sigterm_at_3)
    before = signal.getsignal(signal.SIGTERM)
    trainer = trainer_mod.Trainer(cfg, run, progress=False, device="cpu")
    with stop_on_signals(trainer):  # the command line's handlers
        result = trainer.run()
    assert result["status"] == "SIGTERM" and result["step"] == 3
    assert meta(run)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored

    # Ctrl-C in the middle of step 6's forward pass: the checkpoint is step 5 with step 6's data unread
    calls = {"n": 0}
    real_loss = trainer_mod.score_entropy_loss

    def interrupting_loss(model, *args, **kwargs):
        calls["n"] += model.training  # evaluation calls do not count
        if calls["n"] == 3:  # steps 4, 5, then step 6
            raise KeyboardInterrupt
        return real_loss(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    monkeypatch.setattr(trainer_mod, "score_entropy_loss", interrupting_loss)
    result = train(cfg, run, resume=True, progress=False, device="cpu")
    assert result["status"] == "SIGINT" and result["step"] == 5
    monkeypatch.setattr(trainer_mod, "score_entropy_loss", real_loss)

    result = train(cfg, run, resume=True, progress=False, device="cpu")
    assert result["step"] == 8
    assert_same_state(meta(run), straight_run)


def test_resume_refuses_a_different_model(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus, n_iters=2), run, progress=False)
    cfg = tiny(corpus, n_iters=4)
    cfg.model.hidden_size = 64
    with pytest.raises(trainer_mod.TrainingError, match="hidden_size: 32 -> 64"):
        train(cfg, run, resume=True, progress=False)


def test_a_non_finite_loss_stops_without_saving_over_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    original = trainer_mod.Trainer.train_step

    def diverging(self):
        loss = original(self)
        return loss * float("nan") if self.step >= 3 else loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", diverging)
    with pytest.raises(trainer_mod.TrainingError, match="not finite at step 4"):
        train(tiny(corpus, n_iters=6, checkpoint_every=2), tmp_path / "run", progress=False, device="cpu")
    assert meta(tmp_path / "run")["step"] == 2


# ---- CLI and config ---------------------------------------------------------------------------------


def test_cli_trains_resumes_and_applies_overrides(corpus, tmp_path, capsys):
    run = tmp_path / "cli-run"
    rc = main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(run), "--no-progress",
               "--set", "training.n_iters=4", "--set", "training.lr=1e-3", "--set", "model.hidden_size=48",
               "--set", "training.snapshot_every=4", "--set", "training.eval_every=2"])
    assert rc == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["step"] == 4
    assert "step       2 | train" in out.err and "bits/char" in out.err
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert saved["training"]["lr"] == pytest.approx(1e-3) and saved["model"]["hidden_size"] == 48
    assert saved["data"]["train"] == [str(corpus)]
    assert sedd_core.load(run).config.model.hidden_size == 48

    # again without --resume: refused, nothing touched
    assert main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume without --config reuses the run's train_config.yaml; n_iters raised with --set
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "training.n_iters=6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
    assert meta(run)["step"] == 6

    assert main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "x"),
                 "--set", "training.bogus=1"]) == 2
    assert "training.bogus" in capsys.readouterr().err
    assert main(["train", "--config", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "default, tiny" in capsys.readouterr().err


def test_gpt2_run_trains_offline_with_the_vocabulary_setting_and_then_serves(tmp_path, monkeypatch, gpt2_vocab,
                                                                               capsys):
    """SEDD_GPT2_VOCAB reaches the trainer (as it reaches the server), and the run folder keeps a copy of
    the vocabulary, so the trained model loads and serves with no download and no variable."""
    import tiktoken

    from app.settings import Settings
    from app.state import _load_and_warm

    def no_network(name):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    run = tmp_path / "gpt2-run"
    monkeypatch.setenv("SEDD_GPT2_VOCAB", str(gpt2_vocab))
    rc = main(["train", "--config", "tiny", "--data", str(text), "--out", str(run), "--no-progress", "--device", "cpu",
               "--set", "tokenizer=gpt2", "--set", "training.n_iters=2", "--set", "training.eval_every=2",
               "--set", "training.snapshot_every=2", "--set", "training.checkpoint_every=2"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "gpt2.tiktoken").read_bytes() == gpt2_vocab.read_bytes()

    monkeypatch.delenv("SEDD_GPT2_VOCAB")
    lm = _load_and_warm(Settings(model=str(run), device="cpu"))  # what `sedd serve --model RUN` does, warm-up too
    assert lm.tokenizer.name == "gpt2" and lm.config.tokens == 50257
    assert lm.tokenizer.decode_token(lm.tokenizer.encode(" fox")[0]) == " fox"


def test_packaged_configs_and_overrides():
    cfg = load_train_config("default")
    assert (cfg.tokenizer, cfg.vocab_tokens, cfg.graph.type, cfg.noise.type) == ("char", 98, "absorb", "loglinear")
    m, t = cfg.model, cfg.training
    assert (m.hidden_size, m.cond_dim, m.n_blocks, m.n_heads, m.length, m.dropout) == (256, 64, 6, 4, 128, 0.1)
    assert (t.batch_size, t.lr, t.warmup, t.ema, t.grad_clip, t.export_dtype) == (64, 3e-4, 1000, 0.999, 1.0,
                                                                                  "float16")
    assert cfg.sedd_config().mask_id == 98

    cfg = load_train_config("tiny", ["training.lr=1e-3", "model.n_blocks=2", "graph.type=uniform",
                                     "model.scale_by_sigma=false", "data.train=[a.txt, b.txt]"])
    assert cfg.training.lr == 1e-3 and cfg.model.n_blocks == 2 and cfg.graph.type == "uniform"
    assert cfg.data.train == ["a.txt", "b.txt"]
    with pytest.raises(TrainConfigError, match="model.hidden_sise"):
        load_train_config("tiny", ["model.hidden_sise=3"])
    with pytest.raises(TrainConfigError, match="training.batch_size must be int"):
        load_train_config("tiny", ["training.batch_size=abc"])
    with pytest.raises(TrainConfigError, match="scale_by_sigma"):
        load_train_config("tiny", ["graph.type=uniform"])
    with pytest.raises(TrainConfigError, match="section.key=value"):
        apply_overrides({}, ["training.lr"])


@pytest.mark.parametrize("source", ["default", "tiny", "sedd_core/default_model/train_config.yaml"])
def test_config_files_load_unchanged(source):
    path = Path(sedd_core.__file__).parent.parent / source if source.endswith(".yaml") else source
    cfg = load_train_config(path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    if source.endswith(".yaml"):  # a saved train_config.yaml is written back key for key
        written = cfg.to_dict()
        # keys added after the file was written (fine-tuning's init, experiment tracking) take their defaults
        assert {k: written.pop(k) for k in ("init", "track")} == {"init": None, "track": ["tensorboard"]}
        assert written == yaml.safe_load(path.read_text())


@pytest.mark.parametrize(("override", "message"), [
    ("training.lr=0", "training.lr must be > 0"),
    ("training.batch_size=true", "training.batch_size must be a number"),
    ("training.ema=1", "training.ema must be < 1"),
    ("training.export_dtype=f8", "training.export_dtype must be one of"),
    ("noise.type=cosine", "noise.type must be one of loglinear, geometric"),
    ("model=3", "model must be a mapping"),
    ("push.hots=x", "unknown key push.hots; push takes: host, scheme"),
    ("tokens=5", "tokens is 5 but the char tokenizer has 98"),
    ("model.n_heads=3", "must split into n_heads 3 heads of even width"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match=message):
        load_train_config("tiny", [override])


def test_config_reads_yaml_as_people_write_it():
    cfg = load_train_config("tiny", ["data.train=notes.txt", "training.n_iters=2e5", "data.hf_valid_split=none",
                                     "model.name=123"])
    assert cfg.data.train == ["notes.txt"] and cfg.training.n_iters == 200_000
    assert cfg.data.hf_valid_split is None and cfg.model.name == "123"
    assert load_train_config({"model": None, "training": {"lr": "1e-3"}}).training.lr == 1e-3


def test_training_evaluation_is_the_sedd_eval_estimator(corpus, tmp_path):
    from sedd_core.elbo import elbo_draws

    run = tmp_path / "run"
    cfg = tiny(corpus, n_iters=3, eval_every=3, checkpoint_every=3)
    trainer = trainer_mod.Trainer(cfg, run, device="cpu", progress=False)
    result = trainer.run()
    # the exported EMA weights, as `sedd eval --model RUN_DIR --dtype float32` reads them (the trainer evaluates in float32)
    lm = sedd_core.load(run, device="cpu", dtype="float32")
    crops = torch.cat(trainer.eval_batches)
    draws = elbo_draws(lm.model, lm.graph, lm.noise, crops, samples=1, seed=cfg.training.seed + 3,
                       batch_size=cfg.training.batch_size)
    assert draws.shape == (cfg.training.eval_batches * cfg.training.batch_size, 1)
    assert result["valid_bpc"] == pytest.approx(draws.mean().item() / lm.length / math.log(2), rel=1e-5)


def test_uniform_graph_trains(corpus, tmp_path):
    cfg = load_train_config("tiny", [f"data.train=[{corpus}]", "graph.type=uniform", "model.scale_by_sigma=false",
                                     "training.n_iters=2", "training.eval_every=0", "training.snapshot_every=2"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert math.isfinite(result["valid_loss"])
    lm = sedd_core.load(tmp_path / "run")
    assert lm.config.graph == "uniform" and len(sedd_core.generate(lm, steps=4, seed=0)[0]) == 24


# ---- Oxen push, up to the network ------------------------------------------------------------------


class FakeRemoteRepo:
    instances: ClassVar[list[FakeRemoteRepo]] = []
    existing = True
    created: ClassVar[list[tuple]] = []
    commits: ClassVar[list[dict]] = []

    def __init__(self, repo_id, host="hub.oxen.ai", revision="main", scheme="https"):
        self.repo_id, self.host, self.revision, self.scheme = repo_id, host, revision, scheme
        self.staged: dict[str, bytes] = {}
        FakeRemoteRepo.instances.append(self)

    def exists(self):
        return FakeRemoteRepo.existing

    def add(self, src, dst=""):
        for path in [src] if isinstance(src, (str, Path)) else src:
            name = f"{dst}/{Path(path).name}" if dst else Path(path).name
            self.staged[name] = Path(path).read_bytes()

    def delete_workspace(self):
        self.staged = {}

    def commit(self, message, branch=None):
        FakeRemoteRepo.commits.append({"message": message, "files": dict(self.staged), "repo": self.repo_id,
                                       "host": self.host})
        self.staged = {}


@pytest.fixture
def fake_oxen(monkeypatch):
    FakeRemoteRepo.instances, FakeRemoteRepo.commits, FakeRemoteRepo.created = [], [], []
    FakeRemoteRepo.existing = True
    module = types.ModuleType("oxen")
    module.RemoteRepo = FakeRemoteRepo
    remote_repo = types.ModuleType("oxen.remote_repo")
    remote_repo.create_repo = lambda name, **kw: FakeRemoteRepo.created.append((name, kw))
    module.remote_repo = remote_repo
    monkeypatch.setitem(sys.modules, "oxen", module)
    monkeypatch.setitem(sys.modules, "oxen.remote_repo", remote_repo)
    return FakeRemoteRepo


def test_push_sends_the_model_folder_and_new_snapshots(corpus, tmp_path, fake_oxen):
    run = tmp_path / "run"
    cfg = tiny(corpus, n_iters=4, checkpoint_every=2, snapshot_every=2, eval_every=2)
    cfg.push.background = False
    result = train(cfg, run, repo="me/sedd-toy", progress=False)
    assert result["pushes"] == 2 and result["push_failures"] == 0
    first, last = fake_oxen.commits
    assert first["repo"] == "me/sedd-toy" and first["host"] == "hub.oxen.ai"
    assert set(first["files"]) == {"config.yaml", "checkpoint.pth", "tokenizer_config.json", "train_config.yaml",
                                   "metrics.jsonl", "samples/step_0000002.txt"}
    # snapshots go once; the model files go every time
    assert set(last["files"]) == {"config.yaml", "checkpoint.pth", "tokenizer_config.json", "train_config.yaml",
                                  "metrics.jsonl", "samples/step_0000004.txt"}
    assert last["message"] == "sedd train: step 4"
    assert last["files"]["checkpoint.pth"] == (run / "checkpoint.pth").read_bytes()
    assert not fake_oxen.created


def test_push_creates_a_missing_repo_and_runs_in_the_background(corpus, tmp_path, fake_oxen):
    fake_oxen.existing = False
    cfg = tiny(corpus, n_iters=2, checkpoint_every=1)
    cfg.push.training_state = True
    result = train(cfg, tmp_path / "run", repo="me/new-model", progress=False)
    assert result["step"] == 2 and result["push_failures"] == 0
    assert [name for name, _ in fake_oxen.created] == ["me/new-model"]
    assert fake_oxen.commits[-1]["message"] == "sedd train: step 2"  # the final state is always pushed
    assert "checkpoints-meta/checkpoint.pth" in fake_oxen.commits[-1]["files"]


def test_push_failure_on_the_real_network_is_a_warning(corpus, tmp_path):
    logs: list[str] = []
    cfg = tiny(corpus, n_iters=3, checkpoint_every=2)
    cfg.push.host, cfg.push.scheme = "127.0.0.1:9", "http"  # nothing listens: a real connection error
    result = trainer_mod.train(cfg, tmp_path / "run", repo="me/unreachable", progress=False, log=logs.append)
    assert result["step"] == 3 and result["status"] == "finished"
    assert result["pushes"] == 0 and result["push_failures"] >= 1
    warning = next(line for line in logs if "oxen push" in line)
    assert "failed" in warning and "127.0.0.1:9" in warning and "training goes on" in warning
    assert sedd_core.load(tmp_path / "run").config.model.hidden_size == 32  # the run itself is intact


def test_push_without_the_oxen_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "oxen", None)
    with pytest.raises(OxenPushError, match=r"pip install 'sedd-serve\[oxen\]'"):
        OxenPusher("me/model")
    with pytest.raises(OxenPushError, match="NAMESPACE/NAME"):
        OxenPusher("not-a-repo")


# ---- the global batch: ranks, micro-batches, the opening line ------------------------------------------


def test_micro_batches_split_the_global_batch_without_changing_the_step(corpus, tmp_path):
    """training.batch_size is the batch of one step: split into accum micro-batches it is the same batch
    (crops, times, noise), so the weights after a few steps agree to float tolerance."""
    states, logs = [], []
    for accum in (1, 4):
        run = tmp_path / f"accum{accum}"
        cfg = tiny(corpus, n_iters=4, accum=accum, eval_every=2)
        cfg.model.dropout = 0.0
        train(cfg, run, progress=False, device="cpu", log=logs.append)
        states.append(meta(run))
    for key in states[0]["model"]:
        torch.testing.assert_close(states[0]["model"][key], states[1]["model"][key], rtol=1e-4, atol=1e-5)
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / f"accum{a}" / "metrics.jsonl").open()]
              for a in (1, 4)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert logs[0].startswith("sedd train: world_size=1 (one process)")
    assert "global batch 8 = 1 rank(s) x 4 micro-batch(es) x 2 rows" in next(m for m in logs[1:] if "global" in m)
    assert all(json.loads(line)["world_size"] == 1 for line in (tmp_path / "accum4" / "metrics.jsonl").open())


def test_a_batch_that_does_not_divide_is_refused(corpus, tmp_path, capsys):
    from sedd_core.training.distributed import micro_batch

    assert micro_batch(512, 8, 2) == 32
    with pytest.raises(trainer_mod.TrainingError, match=r"multiple of 16 \(e.g. 496 or 512\)"):
        micro_batch(500, 8, 2)
    rc = main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress",
               "--set", "training.accum=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "training.batch_size=8 is the global batch" in err and "1 rank(s) x training.accum=3" in err
    assert "e.g. 6 or 9" in err
    assert not (tmp_path / "run").exists()


def test_a_world_size_without_torchrun_says_how_to_launch(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["train", "--config", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run")]) == 2
    assert "start data-parallel runs with torchrun" in capsys.readouterr().err


# ---- fine-tuning: sedd train --init --------------------------------------------------------------------


def copy_with_chars(src: Path, dest: Path, chars: str) -> Path:
    """A reference model folder with a character vocabulary of its own (absorb-a has 31 tokens: 29 characters)."""
    import shutil

    shutil.copytree(src, dest)
    (dest / "tokenizer_config.json").write_text(json.dumps({"char_ords": [ord(c) for c in chars]}))
    return dest


ABSORB_A_CHARS = "abcdefghijklmnopqrstuvwxyz .\n"  # 29 characters + [PAD], [UNK] = absorb-a's 31 tokens


def test_fine_tuning_starts_from_the_checkpoint_with_a_fresh_optimizer_and_serves(tiny_five, tmp_path, corpus,
                                                                                   capsys):
    from app.settings import Settings
    from app.state import _load_and_warm
    from sedd_core.training.config import config_for_init

    lm = sedd_core.load(tiny_five, device="cpu", dtype="float32", fast=False)
    cfg = config_for_init({"data": {"train": [str(corpus)]}, "training": {"n_iters": 3, "batch_size": 4}},
                          lm.config, lm.tokenizer.name, str(tiny_five))
    trainer = trainer_mod.Trainer(cfg, tmp_path / "lib-run", device="cpu", progress=False, init=lm)
    start = lm.model.state_dict()
    for key, value in trainer.model.state_dict().items():  # the checkpoint's weights, not a random init
        assert torch.equal(value, start[key]), key
    assert trainer.tokenizer is lm.tokenizer and not trainer.optimizer.state

    run = tmp_path / "run"
    rc = main(["train", "--init", str(tiny_five), "--data", str(corpus), "--out", str(run), "--no-progress",
               "--device", "cpu", "--set", "training.n_iters=3", "--set", "training.batch_size=4",
               "--set", "training.snapshot_every=3", "--set", "model.dropout=0.05"])
    assert rc == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert saved["init"] == str(tiny_five) and saved["model"]["hidden_size"] == 128 and saved["model"]["n_blocks"] == 3
    assert saved["model"]["length"] == 12 and saved["model"]["dropout"] == 0.05  # allowed to differ
    state = meta(run)
    assert state["step"] == 3 and all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())

    lm_run = _load_and_warm(Settings(model=str(run), device="cpu"))  # what `sedd serve --model RUN` does
    assert lm_run.config.model.hidden_size == 128 and lm_run.length == 12
    assert len(sedd_core.generate(lm_run, num_samples=2, steps=8, seed=0)) == 2


@pytest.mark.parametrize("overrides, config, message", [
    (["model.hidden_size=64"], None, "model.hidden_size=64 where .* has 128"),
    (["graph.type=uniform", "model.scale_by_sigma=false"], None, "graph.type='uniform' where .* has 'absorb'"),
    (["tokenizer=gpt2"], None, "tokenizer='gpt2' where .* has 'char'"),
    ([], "tiny", "model.hidden_size=32 where .* has 128; model.cond_dim=16"),
])
def test_fine_tuning_refuses_a_config_that_contradicts_the_checkpoint(tiny_five, tmp_path, corpus, capsys,
                                                                     overrides, config, message):
    args = ["train", "--init", str(tiny_five), "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress"]
    args += ["--config", config] if config else []
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "takes its network, graph, noise and tokenizer from it" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["oxen-layout", "hf-layout"])
def test_fine_tuning_the_reference_checkpoints_in_both_layouts_keeps_their_vocabulary(reference, tmp_path, layout,
                                                                                      capsys):
    """absorb-a (31 tokens, a character vocabulary of its own) in the Oxen and Hugging Face layouts: the run
    keeps the checkpoint's vocabulary, resumes with it, and its folder loads and samples."""
    source = copy_with_chars(reference / "absorb-a" / layout, tmp_path / "absorb-a", ABSORB_A_CHARS)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    run = tmp_path / "run"
    args = ["train", "--init", str(source), "--data", str(text), "--out", str(run), "--no-progress", "--device", "cpu",
            "--set", "training.batch_size=4", "--set", "training.snapshot_every=0", "--set", "track=none"]
    assert main([*args, "--set", "training.n_iters=2"]) == 0, capsys.readouterr().err
    assert json.loads((run / "tokenizer_config.json").read_text())["char_ords"] == [ord(c) for c in ABSORB_A_CHARS]
    assert main([*args, "--resume", "--set", "training.n_iters=4"]) == 0, capsys.readouterr().err
    assert "--init" in capsys.readouterr().err  # on resume the checkpoint of the run wins, and it says so
    assert meta(run)["step"] == 4
    lm = sedd_core.load(run)
    assert lm.config.tokens == 31 and lm.config.model.hidden_size == 64 and lm.tokenizer.chars == ABSORB_A_CHARS
    text = sedd_core.generate(lm, steps=4, seed=0)[0]  # [PAD] and [UNK] draws decode as U+FFFD
    assert text and set(text) - {"\ufffd"} <= set(ABSORB_A_CHARS)


def test_fine_tuning_from_hub_sources_uses_the_loading_settings(reference, tmp_path, corpus, monkeypatch, capsys):
    """oxen: and hf: sources go through SEDD_CACHE like every other command (offline here: the oxen: clone is
    already in the cache, the hf: download is a stand-in that records where it was asked to save)."""
    import shutil

    import huggingface_hub

    cache = tmp_path / "cache"
    copy_with_chars(reference / "absorb-a" / "oxen-layout", cache / "oxen" / "me" / "absorb", ABSORB_A_CHARS)
    calls = []

    def snapshot_download(repo_id, cache_dir=None, **kwargs):
        calls.append((repo_id, cache_dir))
        dest = Path(cache_dir) / "snapshot"
        if not dest.exists():
            copy_with_chars(reference / "absorb-a" / "hf-layout", dest, ABSORB_A_CHARS)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("SEDD_CACHE", str(cache))
    text = tmp_path / "text.txt"
    text.write_text("a lazy dog.\n" * 100)
    for source in ("oxen:me/absorb", "hf:me/absorb"):
        run = tmp_path / source.replace(":", "-").replace("/", "-")
        rc = main(["train", "--init", source, "--data", str(text), "--out", str(run), "--no-progress", "--device",
                   "cpu", "--set", "training.n_iters=1", "--set", "training.batch_size=2",
                   "--set", "training.snapshot_every=0", "--set", "track=none"])
        assert rc == 0, capsys.readouterr().err
        assert yaml.safe_load((run / "train_config.yaml").read_text())["init"] == source
        assert sedd_core.load(run).config.tokens == 31
    assert calls == [("me/absorb", str(cache / "hf"))]
    shutil.rmtree(cache)


def test_fine_tuning_from_an_authors_training_run_takes_its_ema_weights(tiny_five, tmp_path):
    """The third layout: checkpoints-meta/checkpoint.pth (DDP's `module.` keys, an EMA) + .hydra/config.yaml,
    as the authors' trainer writes it. The run starts from the EMA weights, as sampling from it would."""
    from sedd_core.training.config import config_for_init

    weights = torch.load(tiny_five / "checkpoint.pth", weights_only=True)
    folder = tmp_path / "authors-run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text((tiny_five / "config.yaml").read_text())
    names = [k for k in weights if k != "rotary_emb.inv_freq"]
    shadow = [weights[k].float() + 0.01 for k in names]
    (folder / "checkpoints-meta").mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "ema": {"shadow_params": shadow},
                "optimizer": {}, "step": 100}, folder / "checkpoints-meta" / "checkpoint.pth")
    lm = sedd_core.load(folder, device="cpu", dtype="float32", fast=False)
    assert lm.layout == "run"
    cfg = config_for_init({"data": {"train": [str(tmp_path / "x.txt")]}}, lm.config, lm.tokenizer.name, str(folder))
    (tmp_path / "x.txt").write_text("hello world\n" * 50)
    trainer = trainer_mod.Trainer(cfg, tmp_path / "run", device="cpu", progress=False, init=lm)
    params = dict(trainer.model.named_parameters())
    for name, value in zip(names, shadow):
        assert torch.equal(params[name].detach(), value), name


# ---- a token folder as the corpus ----------------------------------------------------------------------


def test_training_reads_a_token_folder_and_checks_its_vocabulary(tmp_path, gpt2_vocab, capsys, monkeypatch):
    text = tmp_path / "docs.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tokens = tmp_path / "tokens"
    monkeypatch.setenv("SEDD_GPT2_VOCAB", str(gpt2_vocab))
    assert main(["data", "tokenize", str(text), "--out", str(tokens), "--quiet"]) == 0
    capsys.readouterr()
    logs: list[str] = []
    cfg = load_train_config("tiny", [f"data.train=[{tokens}]", "tokenizer=gpt2", "training.n_iters=2",
                                     "training.eval_every=2", "training.snapshot_every=0", "track=none"])
    result = train(cfg, tmp_path / "run", progress=False, device="cpu", log=logs.append, gpt2_vocab=gpt2_vocab)
    assert result["step"] == 2 and math.isfinite(result["valid_loss"])
    data_line = next(line for line in logs if line.startswith("data:"))
    assert "memory-mapped from" in data_line and "blocks of 24" in data_line and "the last 5%" in data_line

    cfg = load_train_config("tiny", [f"data.train=[{tokens}]", "training.n_iters=2", "track=none"])
    with pytest.raises(trainer_mod.TrainingError, match="tokenized for the gpt2 tokenizer .* uses the char"):
        train(cfg, tmp_path / "run-char", progress=False, device="cpu")


# ---- experiment tracking ----------------------------------------------------------------------------------


def test_tensorboard_gets_the_metrics_and_the_samples(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny(corpus, n_iters=4, eval_every=2, snapshot_every=4), run, progress=False, device="cpu")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    tags = {"train_loss", "valid_loss", "valid_bpc", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert tags <= set(events.Tags()["scalars"])
    for tag in tags:
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [2, 4]
        assert [e.value for e in logged] == pytest.approx([m[tag] for m in metrics], rel=1e-6)
    assert all(m["grad_norm"] > 0 for m in metrics)
    text = events.Tensors("samples/text_summary")
    assert [e.step for e in text] == [4] and b"=== sample 0 ===" in text[0].tensor_proto.string_val[0]


def test_without_tensorboard_training_goes_on_with_a_notice(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logs: list[str] = []
    result = train(tiny(corpus, n_iters=2, eval_every=2), tmp_path / "run", progress=False, log=logs.append)
    assert result["step"] == 2 and (tmp_path / "run" / "metrics.jsonl").is_file()
    notice = [line for line in logs if "TensorBoard" in line]
    assert len(notice) == 1 and "pip install 'sedd-serve[track]'" in notice[0]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_and_aim_when_asked_for(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "aim", None)
    base = ["train", "--config", "tiny", "--data", str(corpus), "--no-progress", "--set", "training.n_iters=2"]
    for name in ("wandb", "aim"):
        assert main([*base, "--out", str(tmp_path / name), "--track", name]) == 2
        assert f"pip install 'sedd-serve[{name}]'" in capsys.readouterr().err
        assert not (tmp_path / name).exists()

    calls: list[tuple] = []

    class FakeRun:
        id = "run-123"

        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    fake.Html = lambda html: ("html", html)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "tracked"
    args = [*base, "--out", str(run), "--track", "wandb", "--set", "training.eval_every=1",
            "--set", "training.snapshot_every=2"]
    assert main(args) == 0, capsys.readouterr().err
    init = calls[0][1]
    assert calls[0][0] == "init" and init["id"] is None and init["project"] == "sedd-tiny"
    assert init["config"]["training"]["n_iters"] == 2
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "valid_loss" in c[2]] == [1, 2]
    assert any("samples" in c[2] for c in logged) and calls[-1] == ("finish",)
    assert not (run / "tensorboard").exists()  # --track replaces the default
    calls.clear()
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "training.n_iters=3"]) == 0
    assert calls[0][1]["id"] == "run-123"  # the run's own config tracks to W&B, and the same W&B run goes on


def test_the_sedd_small_recipe_is_the_authors_network_and_settings(repo_root, checkpoint_keys):
    """docs/sedd-small-owt.yaml builds the published SEDD-small's exact keys and shapes, with the authors'
    global batch, length, EMA and optimiser."""
    cfg = load_train_config(repo_root / "docs" / "sedd-small-owt.yaml")
    t = cfg.training
    assert (t.batch_size, cfg.model.length, t.ema, t.lr, t.warmup, t.grad_clip) == (512, 1024, 0.9999, 3e-4, 2500, 1.0)
    assert cfg.tokenizer == "gpt2" and cfg.graph.type == "absorb" and cfg.noise.type == "loglinear"
    from sedd_core.model import SEDD

    with torch.device("meta"):
        model = SEDD(cfg.sedd_config())
    published = json.loads(checkpoint_keys.read_text())["sedd-small"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == published["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == published["parameters"]
