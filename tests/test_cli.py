"""The `sedd` command line, run as users run it (a subprocess of the installed console script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import sedd as run


def test_infill_json_keeps_prefix_and_suffix(tiny_five):
    out = run("infill", "--model", str(tiny_five), "--prefix", "ma", "--suffix", "rs", "--steps", "16",
              "--num-samples", "3", "--seed", "4", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3
    assert all(r["text"].startswith("ma") and r["text"].endswith("rs") and r["seed"] == 4 for r in lines)
    assert "denoising" in out.stderr  # the progress bar


def test_sample_with_intermediate_states_and_seed_reproduces(tiny_five):
    args = ("sample", "--model", str(tiny_five), "--steps", "8", "--seed", "9", "--json", "--show-intermediate")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "[step 1/9 sample 0]" in first.stderr and "\u2591" in first.stderr


def test_bad_input_exits_2_with_a_message(tiny_five):
    out = run("infill", "--model", str(tiny_five), "--prefix", "hello wo", "--suffix", "rld!!", "--json")
    assert out.returncode == 2
    assert "leave no room on a canvas of 12 tokens" in out.stderr
    out = run("sample", "--model", "/nonexistent")
    assert out.returncode == 2 and "neither a folder nor a known source" in out.stderr


def test_sampling_controls_flags(tiny_five):
    """--temperature 0: every sample the same text, whatever the seed; the flags land in --json; explicit
    defaults are the default run."""
    base = ("sample", "--model", str(tiny_five), "--steps", "8", "--num-samples", "2", "--json")
    greedy = [run(*base, "--temperature", "0", "--seed", seed) for seed in ("1", "2")]
    assert all(out.returncode == 0 for out in greedy), greedy[0].stderr
    texts = [[json.loads(line)["text"] for line in out.stdout.splitlines()] for out in greedy]
    assert texts[0] == texts[1] and len(set(texts[0])) == 1
    line = json.loads(greedy[0].stdout.splitlines()[0])
    assert (line["temperature"], line["top_p"], line["top_k"], line["min_p"]) == (0.0, 1.0, 0, 0.0)
    plain = run(*base, "--seed", "5")
    explicit = run(*base, "--seed", "5", "--temperature", "1", "--top-p", "1", "--top-k", "0", "--min-p", "0")
    assert plain.returncode == explicit.returncode == 0 and plain.stdout == explicit.stdout
    infill = run("infill", "--model", str(tiny_five), "--prefix", "di", "--steps", "8", "--top-k", "1", "--top-p",
                 "0.5", "--temperature", "0.7", "--json")
    assert infill.returncode == 0 and json.loads(infill.stdout)["text"].startswith("di"), infill.stderr


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--temperature", "-1", "temperature must be a number of at least 0"),
    ("--top-p", "0", "top_p must be a number greater than 0 and at most 1"),
    ("--top-p", "1.5", "top_p must be a number greater than 0 and at most 1"),
    ("--top-k", "-2", "top_k must be an integer of at least 0"),
    ("--min-p", "2", "min_p must be a number between 0 and 1"),
])
def test_out_of_range_controls_exit_2_naming_the_flag_and_range(flag, value, words):
    """Checked before any model loads (the model named here does not exist)."""
    out = run("sample", "--model", "/nonexistent", flag, value)
    assert out.returncode == 2 and f"argument {flag}: {words}" in out.stderr, out.stderr


def test_info_json(tiny_five):
    out = run("info", "--model", str(tiny_five), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tokenizer"] == "char" and info["length"] == 12 and info["parameters"] == 805091


# ---- the command line as a front end: no torch before a command runs, one reading of SEDD_* ------------
def python(code: str, env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env=env)


def test_help_lists_every_command_without_importing_torch():
    out = python("import sys\nfrom sedd_cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                 "    pass\nprint('torch imported:', 'torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    for command in ("sample", "infill", "info", "score", "eval", "serve", "train", "data", "bench"):
        assert command in out.stdout
    assert "torch imported: False" in out.stdout


def test_written_out_choices_match_the_library():
    from benchmarks.presets import PRESETS
    from sedd_cli import bench, generate
    from sedd_core.sampling import PREDICTORS

    assert generate.PREDICTORS == PREDICTORS
    assert bench.PRESET_NAMES == tuple(PRESETS)


WATCH_TORCH = """import os, sys
seen = {}
class WatchTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "at torch" not in seen:
            seen["at torch"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
sys.meta_path.insert(0, WatchTorch())
"""
SERVE = """import uvicorn
uvicorn.run = lambda app, **kw: None
from sedd_cli.main import main
main(["serve", "--model", sys.argv[1]])
"""
UVICORN_PATH = """import app.main
"""


@pytest.mark.parametrize("entry", [SERVE, UVICORN_PATH], ids=["sedd serve", "uvicorn app.main"])
def test_server_sets_its_openmp_wait_policy_before_torch_loads(entry, tiny_five):
    """`sedd serve` itself (not only `make serve`) and `uvicorn app.main:create_app` make OpenMP threads spin
    briefly and then sleep (app/openmp.py) unless the user chose a policy: the variables are in place when
    torch is first imported, which is when the OpenMP runtime reads them."""
    code = WATCH_TORCH + entry + "print('at torch:', seen.get('at torch'))\n"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = python(code, env, str(tiny_five))
    assert out.returncode == 0, out.stderr
    assert "at torch: {'OMP_WAIT_POLICY': None, 'GOMP_SPINCOUNT': '1000', 'KMP_BLOCKTIME': '0'}" in out.stdout
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        out = python(code, env | chosen, str(tiny_five))
        assert out.returncode == 0, out.stderr
        unset = dict.fromkeys(("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"))
        assert f"at torch: {unset | chosen}" in out.stdout


@pytest.mark.parametrize("value", ["y", "1", "true", "yes"])
def test_allow_pickle_means_the_same_to_the_command_line_and_the_server(value, pickled_model, monkeypatch, capsys):
    from app.settings import Settings
    from app.state import _load_and_warm
    from sedd_cli.main import main

    monkeypatch.setenv("SEDD_ALLOW_PICKLE", value)
    assert main(["info", "--model", str(pickled_model), "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["length"] == 12  # after the checkpoint's own "unpickled" line
    lm = _load_and_warm(Settings(model=str(pickled_model), device="cpu", warmup=False))
    assert lm.length == 12


def test_a_pickled_checkpoint_is_refused_by_both_without_the_switch(pickled_model, monkeypatch, capsys):
    from app.settings import Settings
    from app.state import _load_and_warm
    from sedd_cli.main import main
    from sedd_core.loading import CheckpointError

    monkeypatch.setenv("SEDD_ALLOW_PICKLE", "no")
    assert main(["info", "--model", str(pickled_model)]) == 2
    assert "SEDD_ALLOW_PICKLE=1" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="SEDD_ALLOW_PICKLE=1"):
        _load_and_warm(Settings(model=str(pickled_model), device="cpu", warmup=False))


def test_invalid_settings_exit_2_naming_the_variable(tiny_five, monkeypatch, capsys):
    from sedd_cli.main import main

    monkeypatch.setenv("SEDD_ALLOW_PICKLE", "perhaps")
    assert main(["info", "--model", str(tiny_five)]) == 2
    assert "allow_pickle" in capsys.readouterr().err


def test_a_missing_optional_package_is_named_with_its_extra(monkeypatch):
    from sedd_cli.errors import MissingDependency, require

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(MissingDependency, match=r"a Hugging Face dataset needs .*pip install 'sedd-serve\[data\]'"):
        require("datasets", "a Hugging Face dataset")


def test_every_extra_the_errors_name_is_declared_and_installs_that_module():
    """EXTRAS maps an import name to an extra by hand (a module's distribution cannot be found while it is
    missing): each extra must be declared (the installed package's metadata, from pyproject.toml), every
    user-facing extra must be reachable, and where the module is installed here, its distribution must be one
    the extra requires."""
    import importlib.metadata
    import re

    from sedd_cli.errors import EXTRAS

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    declared = importlib.metadata.metadata("sedd-serve").get_all("Provides-Extra")
    required: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("sedd-serve"):
        extra = re.search(r"extra == ['\"]([\w-]+)['\"]", requirement)
        if extra:
            required.setdefault(extra.group(1), set()).add(name(requirement))
    assert set(declared) - {"dev"} == set(EXTRAS.values())
    installed = importlib.metadata.packages_distributions()
    for module, extra in EXTRAS.items():
        for dist in installed.get(module, []):
            assert name(dist) in required[extra], (module, dist, extra)
