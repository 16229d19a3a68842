"""Loading models and tokenizers the one real way (`from_pretrained`), and hashing what identifies them."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Literal, get_args

import torch

from common.cli import UserError, error_line
from common.config import DTypeName


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local directory, and so is `org/name`
    where `org` is an existing local directory (`tiny/teacher` before it is built)."""
    parent = os.path.dirname(name)
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (parent != "" and os.path.isdir(parent))


def check_model_source(name: str, what: str, need_config: bool = True) -> None:
    """A local directory must exist (with config.json for a model); a hub id is left to `from_pretrained`."""
    if os.path.isdir(name):
        if need_config and not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{what} directory has no config.json: {name}")
        return
    if _looks_like_path(name):
        raise UserError(f"{what} directory not found: {name}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device: {name}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available")
    return device


DTYPES: dict[DTypeName, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(DTYPES) | {"auto"} == set(get_args(DTypeName)), "DTYPES must name every DTypeName but auto"


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, fp32 otherwise."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[name]


def _hub_error(err: Exception, name: str, what: str) -> UserError:
    return UserError(f"cannot load {what} {name}: {error_line(err)}")


def load_tokenizer(name: str, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    check_model_source(name, what, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer file raises the tokenizers library's bare Exception
        raise _hub_error(err, name, what) from None


def load_causal_lm(name: str, what: str, device: torch.device, dtype: torch.dtype | Literal["auto"],
                   device_map: str | None = None):
    """`dtype="auto"`: the dtype the model was saved in (`from_pretrained`'s own auto). `device_map="auto"`:
    accelerate places the layers over every visible device instead (and `device` is not used)."""
    from transformers import AutoModelForCausalLM

    check_model_source(name, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map)
    except (OSError, ValueError) as err:
        raise _hub_error(err, name, what) from None
    return model if device_map is not None else model.to(device)


def load_model_config(name: str, what: str):
    from transformers import AutoConfig

    check_model_source(name, what)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _hub_error(err, name, what) from None


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary (token → id, added tokens included): equal hashes, equal token ids."""
    return sha256_json(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))


def model_config_hash(config) -> str:
    return sha256_json(config.to_diff_dict())
