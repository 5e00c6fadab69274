"""Speed and peak memory of model directories: one measuring process forks a child per model, so a model measured
after a bigger one reports its own peak, and a failure is one line that leaves the process serving."""

from __future__ import annotations

import pytest
from conftest import save_tiny, tiny_tokenizer

from whelp.errors import WhelpError
from whelp.evals.speed import SpeedProcess
from whelp.specs import EvalSpec, SpeedSpec

SPEC = EvalSpec(speed=SpeedSpec(prompt_len=8, new_tokens=2, repeats=1))


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    """A small model (about 0.5 MB of weights) and a big one (about 150 MB: a 24,576-wide MLP in 2 layers)."""
    root = tmp_path_factory.mktemp("speed")
    save_tiny(root / "small", tiny_tokenizer())
    save_tiny(root / "big", tiny_tokenizer(), hidden_size=256, intermediate_size=24576, head_dim=64)
    return root


def test_each_model_is_measured_alone_and_its_peak_counts_its_weights(sizes):
    with SpeedProcess() as process:
        small_first = process.measure(str(sizes / "small"), SPEC)
        big = process.measure(str(sizes / "big"), SPEC)
        small_after = process.measure(str(sizes / "small"), SPEC)
    weights = 2 * 3 * 256 * 24576 * 4  # bytes of the big model's MLP, fp32
    assert big["peak_memory_bytes"] >= weights
    for small in (small_first, small_after):
        assert small["peak_memory_bytes"] < weights / 4
        assert small["prefill_tokens_per_s"] > 0 and small["decode_tokens_per_s"] > 0
    assert abs(small_after["peak_memory_bytes"] - small_first["peak_memory_bytes"]) < 16 * 2**20


def test_a_failed_measurement_is_one_line_and_the_next_model_is_measured(sizes, tmp_path):
    with SpeedProcess() as process:
        with pytest.raises(WhelpError, match=r"speed measurement of .*missing failed in its subprocess: .*no such"):
            process.measure(str(tmp_path / "missing"), SPEC)
        assert process.measure(str(sizes / "small"), SPEC)["peak_memory_bytes"] > 0
