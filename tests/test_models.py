"""Model loading: keys, paths, what is refused (pickle, remote code, non-causal models), the conversion cache."""

import json

import pytest
import torch

from conftest import tiny_model
from retrieval_heads import models
from retrieval_heads.errors import UserError, first_line
from retrieval_heads.methods.base import needle_mass
from retrieval_heads.models import load_model, resolve


def save_tiny(path, family="llama", tokenizer=False):
    m = tiny_model(family)
    m.save_pretrained(path)
    if tokenizer:  # a word-level tokenizer over the tiny vocabulary, so that the model loads completely
        from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return m


def test_resolve_keys_paths_and_hub_ids(tmp_path):
    assert resolve("instruct")[:2] == ("instruct", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert resolve("base")[2] == "meta-llama/Meta-Llama-3-8B"
    assert resolve("org/some-model") == ("org--some-model", "org/some-model", "org/some-model")
    with pytest.raises(UserError, match="unknown model key 'instrct' \\(did you mean 'instruct'\\?\\)"):
        resolve("instrct")
    with pytest.raises(UserError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path))


def test_local_tiny_model_loads_with_tokenizerless_error(tmp_path):
    save_tiny(tmp_path / "m")
    with pytest.raises(UserError, match="cannot load model"):  # no tokenizer files beside the weights
        load_model(str(tmp_path / "m"))


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    (tmp_path / "vit").mkdir()
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(UserError, match="is not a causal language model \\(model_type 'vit'\\)"):
        load_model(str(tmp_path / "vit"))


def test_pickle_weights_are_refused(tmp_path):
    """A complete model (config, tokenizer, weights) whose only weights are a pickle: refused by default for
    want of safetensors, and loaded, with the same weights, only when pickle is allowed explicitly."""
    m = save_tiny(tmp_path / "m", tokenizer=True)
    safe = load_model(str(tmp_path / "m"))  # the complete model loads: only the weights' format is refused below
    assert torch.equal(safe.model.lm_head.weight, m.lm_head.weight)
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(m.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot load model .*: .*model\\.safetensors"):
        load_model(str(tmp_path / "m"))
    pickled = load_model(str(tmp_path / "m"), allow_pickle=True)
    assert torch.equal(pickled.model.lm_head.weight, m.lm_head.weight)


def test_first_line():
    assert first_line(ValueError("first\nsecond")) == "first"
    assert first_line(ValueError("  \n  padded  \n")) == "padded"
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError(""), default="") == ""


def test_remote_code_is_not_run_without_the_flag(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    marker = tmp_path / "code_ran"
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(d))
    assert not marker.exists()


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """An interrupted conversion leaves nothing that could be loaded; the next one completes."""
    import transformers

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("llama")

    class FakeTok:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed while writing the weights

    monkeypatch.setattr(type(tiny), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_path()
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2.lock"]  # the temp folder is gone too
    monkeypatch.undo()
    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    path = models.smollm2_path()
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()


def test_probe_on_a_model_split_by_device_map(tmp_path):
    """A tiny model split over device-map entries (one layer offloaded to disk) scores as the whole model."""
    from transformers import AutoModelForCausalLM

    whole = save_tiny(tmp_path / "m")
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dm, offload_folder=tmp_path / "off")
    assert split.hf_device_map["model.layers.1"] == "disk"
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 30)
    mask[:, 5:12] = 1
    a, b = needle_mass(whole, ids, mask), needle_mass(split, ids, mask)
    assert a.shape == (2, 3, 4, 1) and torch.equal(a, b)


def test_corrupt_weights_are_one_line(tmp_path):
    save_tiny(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="cannot load model .*: \\w+"):
        load_model(str(tmp_path / "m"))
