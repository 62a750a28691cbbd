"""The memory estimate of a job spec: what drives it, and that it grows with what should grow it."""

from __future__ import annotations

from typing import Any

from shared.jobspec import DIGITS_MLP_EXAMPLE, known_data_info, parse_job_spec
from shared.resources import MIB, URL_DATASET_MB, Estimate, estimate


def estimate_of(spec: dict[str, Any]) -> Estimate:
    parsed = parse_job_spec(spec)
    return estimate(parsed, known_data_info(parsed["dataset"]))


def text_model(**model: Any) -> dict[str, Any]:
    return {"model": {"type": "transformer", **model}, "dataset": "tiny-text", "training": {"epochs": 1}}


def test_the_example_job_is_small() -> None:
    found = estimate_of(DIGITS_MLP_EXAMPLE)
    assert found.memory_mb < 600 and found.driver == "dataset.name"  # mostly torch itself


def test_each_part_names_the_field_that_drives_it() -> None:
    blobs = {"model": {"type": "mlp"}, "training": {"epochs": 1},
             "dataset": {"name": "blobs", "n_samples": 1_000_000, "n_features": 4096}}
    assert estimate_of(blobs).driver == "dataset.n_samples"
    wide = {"model": {"type": "mlp", "hidden": [65536]}, "dataset": "digits",
            "training": {"epochs": 1, "batch_size": 65536}}
    assert estimate_of(wide).driver == "training.batch_size"
    assert estimate_of(text_model(d_model=1024, n_heads=128, context=8192)).driver == "model.context"
    url = {"model": {"type": "mlp"}, "dataset": {"url": "https://data.example/x.csv"}, "training": {"epochs": 1}}
    found = estimate_of(url)
    assert found.driver == "dataset.url" and found.dataset_bytes == 2 * URL_DATASET_MB * MIB


def test_activations_grow_with_the_batch_and_attention_with_the_context_squared() -> None:
    def batch(size: int) -> Estimate:
        return estimate_of({**DIGITS_MLP_EXAMPLE, "training": {**DIGITS_MLP_EXAMPLE["training"], "batch_size": size}})

    assert batch(1024).activations_bytes == 16 * batch(64).activations_bytes
    short, long = estimate_of(text_model(context=256)), estimate_of(text_model(context=1024))
    assert long.activations_bytes > 8 * short.activations_bytes  # 4x the context: more than 4x (the scores)


def test_the_optimizer_state_counts() -> None:
    def with_optimizer(name: str) -> int:
        spec = {**DIGITS_MLP_EXAMPLE, "model": {"type": "mlp", "hidden": [1024, 1024]},
                "training": {**DIGITS_MLP_EXAMPLE["training"], "optimizer": name, "momentum": 0.0}}
        return estimate_of(spec).parameters_bytes

    assert with_optimizer("adamw") > with_optimizer("sgd")
