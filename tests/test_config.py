"""Config schema: one source of truth, overrides, and clear errors before anything compiles."""
import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ztt_jax import config as config_lib
from ztt_jax import partitioning
from ztt_jax import run as run_lib
from ztt_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_contract_fields_exist_in_default_config():
  cfg = load_config("default")
  for dotted in ["model.variant", "model.num_cycles", "model.exit_threshold", "data.kind", "data.path",
                 "data.seq_len", "train.steps", "train.global_batch_size", "train.seed",
                 "train.learning_rate", "mesh.shape", "checkpoint.every_steps",
                 "checkpoint.max_to_keep", "log.every_steps", "eval.every_steps"]:
    section, field = dotted.split(".")
    assert field in cfg[section], dotted
  parsed = config_lib.parse(cfg)
  assert parsed.model.variant == "ztt" and parsed.data.kind == "propagation"


def test_configdict_round_trip_keeps_every_value():
  cfg = load_config("text", "htc")
  cfg.data.path = "/tmp/corpus.txt"
  parsed = config_lib.parse(cfg)
  again = config_lib.parse(config_lib.to_dict(parsed))
  assert again == parsed
  assert parsed.model.num_cycles == 3 and parsed.data.path == "/tmp/corpus.txt"


def test_text_presets_match_unique_layers():
  layers = set()
  for preset in ["vanilla", "bc", "htc", "ztt"]:
    cfg = load_config("text", preset)
    cfg.data.path = "corpus.txt"
    m = config_lib.parse(cfg).model
    layers.add(m.n_head_layers + m.n_middle_layers + m.n_tail_layers)
  assert layers == {4}
  with pytest.raises(ValueError, match="choose one of"):
    load_config("text", "nope")


@pytest.mark.parametrize("section,field,value,match", [
    ("model", "d_model", 130, "num_heads"),
    ("model", "variant", "loopy", "variant"),
    ("data", "seq_len", 4096, "max_seq_len"),
    ("train", "nonfinite", "ignore", "nonfinite"),
    ("mesh", "shape", (2, -1, -1), "-1"),
])
def test_bad_config_values_raise_clear_errors(section, field, value, match):
  cfg = load_config("default")
  cfg[section][field] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.parse(cfg)


def test_unknown_field_names_valid_fields():
  raw = config_lib.to_dict(config_lib.parse(load_config("default")))
  raw["train"]["learning_rat"] = 1.0
  with pytest.raises(ConfigError, match="Unknown field train.learning_rat. Valid fields: steps, "):
    config_lib.parse(raw)
  del raw["train"]["learning_rat"]
  raw["trian"] = {}
  with pytest.raises(ConfigError, match="Unknown field trian. Valid fields: model, data, train"):
    config_lib.parse(raw)


def test_json_values_come_back_as_the_field_types():
  # A config read back from JSON (checkpoint metadata) has lists for tuples; an override may give
  # an int to a float field.
  raw = config_lib.to_dict(config_lib.parse(load_config("default")))
  raw["mesh"] = {"shape": [-1, 1, 1], "logical_axis_rules": [list(r) for r in raw["mesh"]["logical_axis_rules"]]}
  raw["train"]["peak_flops_per_device"] = 100
  parsed = config_lib.parse(raw)
  assert parsed.mesh == config_lib.MeshConfig(shape=(-1, 1, 1))
  assert isinstance(parsed.train.peak_flops_per_device, float)


def test_mesh_that_does_not_fit_devices():
  assert partitioning.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  with pytest.raises(ConfigError, match="8 are available"):
    partitioning.resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(ConfigError, match="not divisible"):
    partitioning.resolve_mesh_shape((-1, 3, 1), 8)


def test_batch_not_divisible_by_data_parallel_degree():
  cfg = load_config("default")
  cfg.mesh.shape = (8, 1, 1)
  cfg.train.global_batch_size = 12
  with pytest.raises(ConfigError, match="data-parallel degree 8"):
    run_lib.build(config_lib.parse(cfg), jax.devices())


def _cli_config(*overrides):
  """The config as `python -m ztt_jax.train` gets it: ml_collections' config flag, parsing argv."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["train", f"--config={ROOT / 'configs' / 'default.py'}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _optional_fields() -> list[str]:
  import dataclasses
  import typing

  def optional(cls, name):
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])

  out = []
  for section in dataclasses.fields(config_lib.Config):
    cls = type(section.default)
    if dataclasses.is_dataclass(cls):
      out += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls) if optional(cls, f.name)]
    elif optional(config_lib.Config, section.name):
      out.append(section.name)
  return out


@pytest.mark.parametrize("word", ["none", "None", "NONE", ""])
def test_cli_turns_every_optional_field_off(word):
  names = _optional_fields()
  assert "model.exit_threshold" in names and "init_from" in names
  # The multi-hop task: the default's propagation task needs the attention window this turns off.
  cd = _cli_config("--config.data.kind=multihop", *(f"--config.{name}={word}" for name in names))
  for name in names:
    node = cd
    for part in name.split("."):
      node = node[part]
    assert node is None, name
  assert config_lib.parse(cd).model.exit_threshold is None  # the default ztt preset, without exits


def test_cli_optional_fields_still_take_values():
  cd = _cli_config("--config.model.exit_threshold=0.25", "--config.eval.batch_size=8",
                   "--config.model.zero_token=true", "--config.model.remat_policy=none")
  assert (cd.model.exit_threshold, cd.eval.batch_size, cd.model.zero_token) == (0.25, 8, True)
  assert cd.model.remat_policy == "none"  # a str field whose value is the word none stays a str
  with pytest.raises(Exception, match="could not convert string to float"):
    _cli_config("--config.model.exit_threshold=abc")


@pytest.mark.parametrize("section,field,value", [
    ("train", "learning_rate", float("nan")),
    ("train", "b2", float("inf")),
    ("model", "rope_theta", float("-inf")),
    ("data", "eval_fraction", float("nan")),
    ("train", "peak_flops_per_device", float("inf")),  # an Optional float
])
def test_non_finite_floats_are_refused_naming_the_field(section, field, value):
  cfg = load_config("default")
  cfg[section][field] = value
  with pytest.raises(ConfigError, match=rf"^{section}\.{field}=-?(nan|inf): must be a finite number") as e:
    config_lib.parse(cfg)
  assert "\n" not in str(e.value)


def test_non_finite_floats_are_refused_in_a_config_built_in_python():
  cfg = config_lib.parse(load_config("tiny"))
  bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=float("nan")))
  with pytest.raises(ConfigError, match=r"^train\.learning_rate=nan: must be a finite number"):
    bad.validate()  # what trainer.train runs first


def test_non_finite_learning_rate_from_the_command_line_is_refused_before_training(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ztt_jax.train", "--config=configs/tiny.py",
                         f"--workdir={tmp_path / 'run'}", "--config.train.learning_rate=nan"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "train.learning_rate=nan: must be a finite number" in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset, layers_applied, unique_layers", [("1b", 18, 6), ("8b", 34, 10)])
def test_scale_presets_are_the_llama_widths_they_name(preset, layers_applied, unique_layers):
  """configs/scale.py (the pod scale table): the model's params, from an abstract init, against the
  Llama formula (untied 128k head, grouped-query attention, SwiGLU, two RMSNorms per layer)."""
  from ztt_jax.model import ZTTModel
  m = config_lib.parse(load_config("scale", preset)).model
  shapes = jax.eval_shape(lambda r: ZTTModel(m).init(r, jnp.zeros((1, 16), jnp.int32)), jax.random.key(0))
  got = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
  D, H, K, KV, F, V = m.d_model, m.num_heads, m.d_model // m.num_heads, m.num_kv_heads, m.mlp_dim, m.vocab_size
  layer = 2 * D * H * K + 2 * D * KV * K + 3 * D * F + 2 * D
  pool = m.num_cycles * m.n_middle_layers * H * K
  assert got == 2 * V * D + unique_layers * layer + D + pool
  assert m.effective_depth == layers_applied and V == 128256 and not m.tie_embeddings


@pytest.mark.parametrize("config_file, default", [("default", "ztt"), ("multihop", "ztt"), ("text", "ztt"),
                                                  ("scale", "1b")])
def test_an_unknown_preset_names_the_choices(config_file, default):
  with pytest.raises(ValueError, match=rf"^Unknown preset 'nope' for configs/{config_file}\.py; choose one of "
                                        rf"\[.*'{default}'.*\], e.g. --config=configs/{config_file}\.py:\w+$"):
    load_config(config_file, "nope")
  assert load_config(config_file, "").to_dict() == load_config(config_file, default).to_dict()


def test_an_unknown_preset_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ztt_jax.train", "--config=configs/default.py:nope",
                         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert "Unknown preset 'nope' for configs/default.py" in last and "--config=configs/default.py:" in last, proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()
