"""Model sources: hub ids go to `from_pretrained`, missing local directories are refused by name."""
from __future__ import annotations

import pytest
import torch
import transformers

from common.cli import UserError
from common.models import load_causal_lm, load_model_config, load_tokenizer, resolve_dtype

CPU = torch.device("cpu")
LOADERS = {
    "model": (transformers.AutoModelForCausalLM, lambda name: load_causal_lm(name, "model", CPU, torch.float32)),
    "tokenizer": (transformers.AutoTokenizer, lambda name: load_tokenizer(name, "tokenizer")),
    "config": (transformers.AutoConfig, lambda name: load_model_config(name, "config")),
}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """A working directory where no local folder can shadow a hub id."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("what", list(LOADERS))
@pytest.mark.parametrize("name", ["gpt2", "distilgpt2", "openai-community/gpt2"])
def test_hub_ids_are_passed_to_from_pretrained(empty_cwd, monkeypatch, what, name):
    auto_class, load = LOADERS[what]
    calls = []

    def unreachable_hub(model_id, **kwargs):
        calls.append(model_id)
        raise OSError("hub not reachable\nmore detail")

    monkeypatch.setattr(auto_class, "from_pretrained", unreachable_hub)
    with pytest.raises(UserError) as info:
        load(name)
    assert calls == [name]
    assert str(info.value) == f"cannot load {what} {name}: hub not reachable"  # the hub's error, one line


@pytest.mark.parametrize("what", list(LOADERS))
@pytest.mark.parametrize("name", ["./absent", "/absent/model", "a/b/c", "~/absent-model", "org/name"])
def test_missing_local_directories_are_refused(empty_cwd, monkeypatch, what, name):
    (empty_cwd / "org").mkdir()  # `org/name` is then meant as a local path
    auto_class, load = LOADERS[what]

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called for a missing directory")

    monkeypatch.setattr(auto_class, "from_pretrained", never)
    with pytest.raises(UserError, match=f"^{what} directory not found: {name}$"):
        load(name)


def test_local_directory_without_config_is_refused(empty_cwd):
    (empty_cwd / "model").mkdir()
    with pytest.raises(UserError, match="^model directory has no config.json: model$"):
        load_causal_lm("model", "model", CPU, torch.float32)


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16), ("auto", torch.float32)])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name, CPU) is dtype  # auto: float32 on a CPU
