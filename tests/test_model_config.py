"""ModelConfig: construction from dict/ConfigDict, validation messages, variant layout."""
import dataclasses

import ml_collections
import pytest

from ztt_jax.errors import ConfigError
from ztt_jax.model import ModelConfig


def test_fields_are_simple_types_and_roundtrip_through_configdict():
  cfg = ModelConfig(d_model=64, variant="htc", zero_token=True, exit_threshold=0.5)
  for f in dataclasses.fields(ModelConfig):
    assert f.type in ("int", "float", "str", "bool", "Optional[bool]", "Optional[int]", "Optional[float]"), f
  cd = ml_collections.ConfigDict(cfg.to_dict())
  assert ModelConfig.from_any(cd) == cfg
  assert ModelConfig.from_any(ml_collections.FrozenConfigDict(cd)) == cfg
  assert ModelConfig.from_any(cfg.to_dict()) == cfg
  assert ModelConfig.from_any(cfg) is cfg


def test_unknown_key_is_named_and_valid_keys_listed():
  # The message every config section gives (ztt_jax/schema.py).
  with pytest.raises(ConfigError, match="^Unknown field model.num_head. Valid fields: vocab_size, d_model, num_heads"):
    ModelConfig.from_any({"d_model": 64, "num_head": 4})


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=130, num_heads=4), "d_model"),
    (dict(variant="ztt2"), "variant"),
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(mlp="relu"), "mlp"),
    (dict(remat_policy="everything"), "remat_policy"),
    (dict(exit_granularity="batch"), "exit_granularity"),
    (dict(min_cycles=5, num_cycles=4), "min_cycles"),
    (dict(zero_token_layers="head"), "zero_token_layers"),
    (dict(dtype="float16"), "dtype"),
    (dict(n_middle_layers=0), "n_middle_layers"),
    (dict(n_head_layers=-1), "n_head_layers"),
    (dict(cycle_loss_weight=-1.0), "cycle_loss_weight"),
    (dict(d_model=12, num_heads=4), "num_heads"),  # head_dim 3 is odd: rope impossible
])
def test_validate_names_the_field(kw, field):
  with pytest.raises(ConfigError, match=rf"model\.{field}="):
    ModelConfig(**kw).validate()


def test_variant_presets_aliases_and_overrides():
  base = dict(n_head_layers=1, n_middle_layers=2, n_tail_layers=1, num_cycles=3)
  # (zero_token, shares_head_tail, cycles, stack_layers, effective_depth)
  want = {
      "vanilla": (False, False, 1, 2, 4),
      "basic_cycling": (False, True, 3, 4, 12),
      "bc": (False, True, 3, 4, 12),
      "head_tail_cycling": (False, False, 3, 2, 8),
      "htc": (False, False, 3, 2, 8),
      "ztt": (True, False, 3, 2, 8),
  }
  for variant, w in want.items():
    c = ModelConfig(variant=variant, **base).validate()
    assert (c.use_zero_token, c.shares_head_tail, c.cycles, c.stack_layers, c.effective_depth) == w, variant
  c = ModelConfig(variant="htc", zero_token=True, **base)
  assert c.use_zero_token and not c.shares_head_tail
  c = ModelConfig(variant="ztt", zero_token=False, share_head_tail=True, **base)
  assert not c.use_zero_token and c.shares_head_tail and c.effective_depth == 12
  assert ModelConfig(d_model=96, num_heads=3).head_dim == 32
