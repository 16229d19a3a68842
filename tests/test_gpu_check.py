"""bench/gpu_check.py's own arithmetic and refusals; its run on a GPU is not part of the suite (no GPU here),
its whole path on the CPU is `python -m bench.gpu_check --smoke --device cpu` (docs/performance.md)."""
from __future__ import annotations

import pytest

from bench.gpu_check import STUDENT_CONFIG, TEACHER_CONFIG, forward_flops_per_token, shapes
from tests.conftest import run_cli
from tiny_world.models import ModelShape


def qwen2_matmul_params(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Every weight a token's forward pass multiplies by, counted from Qwen2's architecture by hand: q, k, v
    (with biases) and o projections, the SwiGLU MLP's three matrices, two RMSNorms a layer, the final norm
    and the output head."""
    head_dim = hidden // heads
    attention = hidden * hidden + hidden + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim) + hidden * hidden
    return layers * (attention + 3 * hidden * intermediate + 2 * hidden) + hidden + hidden * vocab


def test_the_shipped_configs_are_qwen2_7b_and_1_5b():
    teacher, student = ModelShape.of_config(TEACHER_CONFIG), ModelShape.of_config(STUDENT_CONFIG)
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.num_key_value_heads) == (3584, 28, 4)
    assert (student.hidden_size, student.num_hidden_layers, student.tie_word_embeddings) == (1536, 28, True)
    smoke_teacher, smoke_student = shapes(smoke=True)
    assert smoke_student.tie_word_embeddings and not smoke_teacher.tie_word_embeddings


@pytest.mark.parametrize("config, vocab", [pytest.param(TEACHER_CONFIG, 152_064, marks=pytest.mark.slow),
                                           (STUDENT_CONFIG, 151_936)])
def test_flops_per_token_count_every_multiplied_weight_and_the_attention(config, vocab):
    shape = ModelShape.of_config(config)
    matmul = qwen2_matmul_params(shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size,
                                 shape.num_attention_heads, shape.num_key_value_heads, vocab)
    expected = 2 * matmul + 4 * shape.num_hidden_layers * 1024 * shape.hidden_size
    assert forward_flops_per_token(shape, vocab, 1024) == expected
    if config == TEACHER_CONFIG:  # Qwen2-7B: 7,615,616,512 parameters, its input embedding 152,064 × 3,584 of them
        assert matmul == 7_615_616_512 - 152_064 * 3584


@pytest.mark.slow
def test_it_refuses_the_cpu_without_smoke_and_a_missing_input(tmp_path):
    cpu = run_cli("bench.gpu_check", "--device", "cpu", "--out", tmp_path)
    assert cpu.returncode == 2 and cpu.stderr.strip() == "error: --device cpu is for --smoke only: the real " \
                                                         "shapes need a GPU"
    missing = run_cli("bench.gpu_check", "--smoke", "--device", "cpu", "--tokenizer", tmp_path / "none",
                      "--out", tmp_path)
    assert missing.returncode == 2 and "--tokenizer" in missing.stderr and "Traceback" not in missing.stderr
