"""One `ActorPool` evaluates two models in the same actors (a reference, then the final model),
and an actor Ray restarts mid-unit loads the model its unit names again, not the one it started
with. Local Ray, two tiny random Llamas written to disk."""

from __future__ import annotations

import numpy as np
import pytest

from training.reevaluation import FAULT_ENV, ActorPool, ModelSpec, Unit, load_eval_model, sequence_losses


def tiny_model(folder, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=16)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def test_one_pool_evaluates_two_models_and_a_restarted_actor_reloads_the_named_one(tmp_path, monkeypatch):
    final = ModelSpec(tiny_model(tmp_path / "final", 0))
    reference = ModelSpec(tiny_model(tmp_path / "reference", 1))
    tokens = np.random.default_rng(0).integers(0, 64, size=(12, 16))
    expected = {spec.uri: sequence_losses(load_eval_model(spec), tokens, 32) for spec in (final, reference)}
    assert not np.allclose(expected[final.uri], expected[reference.uri])  # two different models

    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "died-once"))  # the first unit's actor dies mid-unit
    units = [Unit(start, tokens[start : start + 4], 0) for start in range(0, 12, 4)]
    got: dict[str, dict[int, np.ndarray]] = {final.uri: {}, reference.uri: {}}
    with ActorPool(1, final, max_retries=2) as pool:
        pool.run(units, lambda unit, losses: got[reference.uri].__setitem__(unit.key, losses), by_id=False, spec=reference)
        assert (tmp_path / "died-once").exists() and pool.retried == 1
        pool.run(units, lambda unit, losses: got[final.uri].__setitem__(unit.key, losses), by_id=False)
    for uri, parts in got.items():
        np.testing.assert_allclose(np.concatenate([parts[key] for key in sorted(parts)]), expected[uri], rtol=0, atol=1e-6)
