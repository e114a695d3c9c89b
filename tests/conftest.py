"""Fixtures shared by the tests: tiny random models of several families, and the embedded SmolLM2.

Every test that uses a fixture loading SmolLM2's weights (``smollm2``, ``smollm2_bf16``, directly or through
another fixture) is marked ``slow`` here; tests that run the real model otherwise (through the CLI) carry
the mark themselves. ``pytest -m "not slow"`` is the fast loop; the tokenizer alone (``smollm2_tokenizer``)
is cheap and stays in it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str):
    """A tiny config per family, each with the feature the probe must honour."""
    import transformers as t

    if family == "llama":
        return t.LlamaConfig(**TINY)
    if family == "mistral":  # sliding window shorter than the test prompts
        return t.MistralConfig(**TINY, sliding_window=16)
    if family == "qwen2":
        return t.Qwen2Config(**TINY)
    if family == "qwen3":  # q/k norms
        return t.Qwen3Config(**TINY, head_dim=16)
    if family == "gemma2":  # logit soft-capping, alternating sliding/full layers
        return t.Gemma2Config(**TINY, head_dim=16, sliding_window=16, attn_logit_softcapping=5.0,
                              query_pre_attn_scalar=16)
    if family == "phi3":
        return t.Phi3Config(**TINY, pad_token_id=0)
    if family == "gpt2":  # no GQA, learned absolute positions
        return t.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=256, bos_token_id=0,
                            eos_token_id=0)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


# fixtures that load SmolLM2's weights, and the fault matrix's launcher (one process per scenario)
MODEL_FIXTURES = {"smollm2", "smollm2_bf16", "runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:  # SmolLM2's weights, the fault launcher, or a browser: not for the fast loop
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (the model is converted from GGUF on the first run on a machine)."""
    from transformers import AutoTokenizer

    from retrieval_heads.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model, loaded once (converted from GGUF on the first run on a machine)."""
    from transformers.utils import logging

    from retrieval_heads.models import load_model

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return load_model("smollm2")


SMOL_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2)  # a tiny Llama that reads SmolLM2's tokenizer


def save_tiny(d, seed: int = 0, layers: int = 2, positions: int = 512):
    """A folder ``d`` holding a tiny random Llama (safetensors) and SmolLM2's tokenizer files: a local
    model that loads like any other (real prompts, fast passes). Returns ``d``."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_heads.models import smollm2_path

    d.mkdir(parents=True, exist_ok=True)
    for f in smollm2_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOL_TINY, num_hidden_layers=layers, max_position_embeddings=positions)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def tiny_smol_lm(layers: int = 3, positions: int = 1024):
    """The same tiny Llama in memory, as a LoadedModel with SmolLM2's tokenizer (key and name ``tiny``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from retrieval_heads.models import LoadedModel, smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOL_TINY, num_hidden_layers=layers, max_position_embeddings=positions)
    return LoadedModel(LlamaForCausalLM(cfg).eval(), tok, "tiny", "tiny")


def cli(capfd, *args):
    """Run the CLI in this process: (exit code, stdout, stderr), captured at the file-descriptor level."""
    from retrieval_heads.cli import main

    capfd.readouterr()
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def one_line(rc, err, msg=""):
    """Assert the one-line error of bad input (exit 2, one ``error:`` line holding ``msg``); returns it."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], err
    return lines[0]
