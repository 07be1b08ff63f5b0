"""checkpoint.replica_parallel_min_bytes: a replicated array smaller than the threshold is written
whole by one replica, so a save compiles no slice programs; at 0 Orbax splits it across replicas
(one compiled slice per shape), which is what the tiny test runs paid 1,440 times per run."""
import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ztt_jax.checkpointing import Checkpointer
from ztt_jax.config import CheckpointConfig


def _save_and_count_slice_compiles(tmp_path, caplog, min_bytes, shape):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  state = {"w": jax.device_put(jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape),
                               NamedSharding(mesh, P()))}  # replicated over 8 devices
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpt = Checkpointer(str(tmp_path / f"ckpt{min_bytes}"),
                      CheckpointConfig(async_save=False, replica_parallel_min_bytes=min_bytes))
  caplog.clear()
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    assert ckpt.save(1, state, data_iter, {"note": "x"}, force=True)
    ckpt.wait()
  slices = [r for r in caplog.records if "Compiling" in r.getMessage() and "slice" in r.getMessage()]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  restored = ckpt.restore(abstract, data_iter)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.asarray(state["w"]))
  return len(slices)


def test_small_replicated_arrays_are_saved_without_slice_programs(tmp_path, caplog):
  # Shapes used nowhere else, so no earlier compile is cached in this process.
  assert _save_and_count_slice_compiles(tmp_path, caplog, 1 << 20, (41, 24)) == 0
  assert _save_and_count_slice_compiles(tmp_path, caplog, 0, (43, 24)) > 0  # Orbax's default splits
