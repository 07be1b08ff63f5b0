"""Export a training run's checkpoint: `python -m ztt_jax.export --workdir=DIR --out=PATH`
[--step=N] [--format=safetensors|orbax] [--unscan] [--dtype=float32|bfloat16] [--overwrite]."""
from absl import flags

from ztt_jax import cli, export, restore


def main(argv):
  del argv
  f = flags.FLAGS
  path = restore.export_run(f.workdir, f.out, f.step, f.format, f.unscan, f.dtype, overwrite=f.overwrite)
  meta = export.read_config(path)
  print(f"exported {meta['source'].get('workdir')} step {meta['source'].get('step')} -> {path} "
        f"({meta['storage']}, {'unscanned' if meta['unscanned'] else 'scanned'}, {meta['dtype']})")


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).", required=True)
  flags.DEFINE_string("out", None, "Export directory to write.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_enum("format", "safetensors", list(export.STORAGES), "Storage of the params.")
  flags.DEFINE_bool("unscan", False, "Store each layer of a stack under its own name.")
  flags.DEFINE_enum("dtype", None, list(export.DTYPES), "Cast params to this dtype; default keep.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out, if it is an export written by "
                    "ztt_jax and holds nothing else.")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
