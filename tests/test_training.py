"""`sedd train`: run folder layout, loss, exact resume, CLI, config overrides, Oxen push."""
from __future__ import annotations

import json
import math
import os
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
    assert len(texts) == 2 and all(set(t) <= set(DEFAULT_CHARS) for t in texts)
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
    from sedd_core.evaluate import elbo_draws

    run = tmp_path / "run"
    cfg = tiny(corpus, n_iters=3, eval_every=3, checkpoint_every=3)
    trainer = trainer_mod.Trainer(cfg, run, device="cpu", progress=False)
    result = trainer.run()
    lm = sedd_core.load(run, device="cpu")  # the exported EMA weights, as `sedd eval --model RUN_DIR` reads them
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
