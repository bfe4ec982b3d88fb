"""Every checkpoint layout and source form, and the errors that tell a user what to fix."""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

import sedd_core
from sedd_core import hub, loading
from sedd_core.loading import CheckpointError, LoadedModel, detect_layout
from sedd_core.model import SEDD, LayerNorm


@pytest.fixture
def char_folder(tmp_path, tiny_config, write_oxen_folder):
    return write_oxen_folder(tmp_path / "char", tiny_config(tokens=98, length=16))


def same_weights(a: LoadedModel, b: LoadedModel) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_oxen_layout(char_folder, monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: None)  # a CPU without native bf16
    lm = sedd_core.load(char_folder, device="cpu")
    assert lm.layout == "oxen" and lm.tokenizer.name == "char" and lm.length == 16
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"


def test_hf_layouts_give_the_same_model(char_folder, tmp_path):
    oxen = sedd_core.load(char_folder, device="cpu")
    state = torch.load(char_folder / "checkpoint.pth", weights_only=True)
    config = yaml.safe_load((char_folder / "config.yaml").read_text())
    for weights in ("model.safetensors", "pytorch_model.bin"):
        folder = tmp_path / weights
        folder.mkdir()
        (folder / "config.json").write_text(__import__("json").dumps(config))
        if weights.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
        else:
            torch.save(state, folder / weights)
        lm = sedd_core.load(folder, device="cpu")
        assert lm.layout == "hf" and same_weights(lm, oxen)


def test_reference_layouts_agree(reference):
    from sedd_core.loading import load_network

    a, _, layout_a = load_network(reference / "absorb-a" / "oxen-layout", torch.device("cpu"), torch.float32)
    b, _, layout_b = load_network(reference / "absorb-a" / "hf-layout", torch.device("cpu"), torch.float32)
    assert (layout_a, layout_b) == ("oxen", "hf")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_run_layout_samples_from_ema(char_folder, tmp_path, tiny_config):
    """checkpoints-meta/checkpoint.pth with model/ema/optimizer/step: the EMA shadow wins."""
    config = tiny_config(tokens=98, length=16)
    model = SEDD(config)
    shadow = [torch.full_like(p, 0.01 * i) for i, p in enumerate(model.parameters())]
    run = tmp_path / "run"
    (run / "checkpoints-meta").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP prefix, as the authors save
    torch.save({"model": state, "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow},
                "optimizer": {}, "step": 3}, run / "checkpoints-meta" / "checkpoint.pth")
    lm = sedd_core.load(run, device="cpu", dtype="float32")
    assert lm.layout == "run"
    for p, s in zip(lm.model.parameters(), shadow):
        assert torch.equal(p, s)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no SEDD checkpoint in .*notes.txt.*Expected checkpoint.pth"):
        sedd_core.load(tmp_path)


def test_missing_source():
    with pytest.raises(CheckpointError, match="neither a folder nor a known source"):
        sedd_core.load("/nonexistent/model")


def test_config_that_does_not_match_the_weights(char_folder):
    config = yaml.safe_load((char_folder / "config.yaml").read_text())
    config["model"]["hidden_size"] = 64
    (char_folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*vocab_embed.embedding"):
        sedd_core.load(char_folder)


def test_unknown_tokenizer_is_named(tmp_path, tiny_config, write_oxen_folder):
    folder = write_oxen_folder(tmp_path / "odd", tiny_config(tokens=37, length=8))
    with pytest.raises(sedd_core.tokenizers.TokenizerError, match="37 tokens"):
        sedd_core.load(folder)


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickles_beyond_tensors_are_refused_unless_allowed(char_folder, monkeypatch):
    state = torch.load(char_folder / "checkpoint.pth", weights_only=True)
    torch.save({"model": state, "extra": Evil()}, char_folder / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="SEDD_ALLOW_PICKLE=1"):
        sedd_core.load(char_folder)
    monkeypatch.setenv("SEDD_ALLOW_PICKLE", "1")  # the library reads no environment: still refused
    with pytest.raises(CheckpointError, match="weights_only"):
        sedd_core.load(char_folder)
    assert sedd_core.load(char_folder, allow_pickle=True).layout == "oxen"


def test_unknown_dtype_and_missing_cuda(char_folder):
    with pytest.raises(CheckpointError, match="unknown dtype"):
        sedd_core.load(char_folder, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="sees no CUDA GPU"):
            sedd_core.load(char_folder, device="cuda")


def test_bfloat16_stores_the_matmul_weights_once_and_keeps_norms_and_rotary_in_float32(char_folder):
    lm = sedd_core.load(char_folder, device="cpu", dtype="bfloat16")
    norms = {name for name, module in lm.model.named_modules() if isinstance(module, LayerNorm)}
    for name, param in lm.model.named_parameters():
        owner = name.rpartition(".")[0]
        assert param.dtype == (torch.float32 if owner in norms else torch.bfloat16), name
    assert len(norms) == 2 * len(lm.model.blocks) + 1
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32
    texts = sedd_core.generate(lm, num_samples=2, steps=4, seed=0, prefix="ab")
    assert all(t.startswith("ab") for t in texts)


def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_native_bf16(char_folder, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: "avx512_bf16")
    assert loading.choose_dtype(None, cpu) == (torch.bfloat16, "auto: this CPU has avx512_bf16 (native bfloat16 "
                                                                "matmuls)")
    assert loading.choose_dtype("auto", cpu)[0] == torch.bfloat16
    assert loading.choose_dtype("float32", cpu) == (torch.float32, "asked")  # SEDD_DTYPE / --dtype win
    lm = sedd_core.load(char_folder, device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.dtype_choice.startswith("auto: this CPU has avx512_bf16")
    assert lm.model.blocks[0].attn_qkv.weight.dtype == torch.bfloat16

    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: None)  # emulated bf16 would be slower: float32
    assert loading.choose_dtype(None, cpu) == (torch.float32, "auto: this CPU has no native bfloat16 instructions")
    assert loading.choose_dtype("bf16", cpu) == (torch.bfloat16, "asked")
    lm = sedd_core.load(char_folder, device="cpu")
    assert lm.dtype == torch.float32 and lm.model.blocks[0].attn_qkv.weight.dtype == torch.float32
    assert loading.choose_dtype(None, torch.device("cuda")) == (torch.bfloat16, "auto: bfloat16 on CUDA")


@pytest.mark.parametrize(("capabilities", "mkldnn_bf16", "found"), [
    ({"avx512_bf16": True, "amx_bf16": False}, True, "avx512_bf16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx512_bf16": True, "amx_bf16": True}, True, "amx_bf16"),  # Intel Sapphire Rapids and later
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, True, None),  # AVX-512 without bf16: emulated
    ({"architecture": "arm64"}, True, None),
    ({"avx512_bf16": True}, False, None),  # oneDNN would not run bf16 matmuls here at all
])
def test_cpu_bf16_probe_reads_pytorchs_cpu_capabilities(monkeypatch, capabilities, mkldnn_bf16, found):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
    assert loading.cpu_bf16_support() == found


# ---- hub sources, up to the network boundary ---------------------------------------------

def test_oxen_source_clones_once_into_the_cache(char_folder, tmp_path, monkeypatch):
    import oxen
    cache = tmp_path / "cache"
    calls = []

    def fake_clone(repo_id, path=None, host=None, **kw):
        calls.append((repo_id, host))
        shutil.copytree(char_folder, path)

    monkeypatch.setattr(oxen, "clone", fake_clone)
    lm = sedd_core.load("oxen:models/SEDD-tiny", device="cpu", cache_dir=cache)
    assert lm.path == cache / "oxen" / "models" / "SEDD-tiny"
    sedd_core.load("oxen:models/SEDD-tiny", device="cpu", cache_dir=cache, oxen_host="oxen.example")
    assert calls == [("models/SEDD-tiny", "hub.oxen.ai")]  # cloned once: the second load found the folder
    sedd_core.load("oxen:models/other", device="cpu", cache_dir=cache, oxen_host="oxen.example")
    assert calls[-1] == ("models/other", "oxen.example")


def test_failed_oxen_download_leaves_no_half_folder(tmp_path, monkeypatch):
    import oxen

    def failing_clone(repo_id, path=None, host=None, **kw):
        (tmp_path / "x").mkdir(exist_ok=True)
        __import__("os").makedirs(path)
        open(f"{path}/checkpoint.pth", "wb").write(b"partial")
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(oxen, "clone", failing_clone)
    with pytest.raises(hub.HubError, match="could not clone oxen:models/SEDD-large.*network unreachable"):
        sedd_core.load("oxen:models/SEDD-large", cache_dir=tmp_path / "cache")
    parent = tmp_path / "cache" / "oxen" / "models"
    assert list(parent.iterdir()) == []


def test_real_oxen_clone_without_network_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(hub.HubError, match="could not clone"):  # nothing listens on the discard port
        hub.fetch_oxen("models/SEDD-large", host="127.0.0.1:9", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "oxen" / "models" / "SEDD-large").exists()


def test_hf_source_uses_snapshot_download(char_folder, tmp_path, monkeypatch):
    import huggingface_hub
    seen = {}

    def fake_snapshot_download(repo_id, cache_dir=None, allow_patterns=None):
        seen.update(repo_id=repo_id, cache_dir=cache_dir)
        return str(char_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    lm = sedd_core.load("hf:louaaron/sedd-small", device="cpu", cache_dir=tmp_path / "cache")
    assert seen == {"repo_id": "louaaron/sedd-small", "cache_dir": str(tmp_path / "cache" / "hf")}
    assert lm.layout == "oxen"


def test_hf_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="could not download hf:louaaron/sedd-small"):
        sedd_core.load("hf:louaaron/sedd-small", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("spec", ["oxen:noslash", "oxen:a/b/c", "hf:../etc"])
def test_malformed_hub_sources(spec):
    with pytest.raises(hub.HubError, match="is not of the form"):
        sedd_core.load(spec)


def test_detect_layout_prefers_oxen_export_over_training_state(char_folder):
    (char_folder / "checkpoints-meta").mkdir()
    pickle.dump({}, open(char_folder / "checkpoints-meta" / "checkpoint.pth", "wb"))
    assert detect_layout(char_folder)[0] == "oxen"


def test_compile_auto_is_the_frozen_graph_on_a_cpu_with_a_cpp_compiler_only(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loading, "cpp_compiler", lambda: "/usr/bin/g++")
    assert loading.resolve_compile("auto", cpu) == "freeze"
    assert loading.resolve_compile("auto", cuda) is None  # a GPU host starts without compiling
    monkeypatch.setattr(loading, "cpp_compiler", lambda: None)  # Inductor could not build its CPU kernels
    assert loading.resolve_compile("auto", cpu) is None
    lm = sedd_core.load("default", device="cpu", compile="auto")
    assert not lm.runner.compiled
    for given in (None, "freeze", "reduce-overhead"):
        assert loading.resolve_compile(given, cpu) == given
