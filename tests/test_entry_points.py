"""Every `python -m ztt_jax...` command answers a bad argument with one line on stderr and exit 2.

The entry points are found, not listed: every module with `if __name__ == "__main__"` and every
package `__main__.py`, so a new command is covered without editing this file.

A `python -m` subprocess each would cost a jax import each (~2 s of CPU; 40 s for the lot on a
busy 2-core host). Instead one subprocess (this file run as a script) imports the third-party
libraries once and forks a child per case, which runs the module as `python -m` does
(runpy, as __main__). One case also runs as a real `python -m`, alongside.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_MAIN = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def entry_points() -> list:
  mods = []
  for path in sorted((ROOT / "ztt_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    if path.name == "__main__.py":
      mods.append(".".join(rel.parts[:-1]))
    elif _MAIN.search(path.read_text()):
      mods.append(".".join(rel.parts))
  return mods


def test_every_entry_point_refuses_a_bad_argument_in_one_line():
  mods = entry_points()
  assert {"ztt_jax.train", "ztt_jax.export", "ztt_jax.bench", "ztt_jax.flops",
          "ztt_jax.experiments.ablation"} <= set(mods), mods
  # (module, args, what the one line must name)
  cases = [(m, ["--no_such_flag=1"], "no_such_flag") for m in mods]
  cases += [("ztt_jax.experiments.ablation", ["--rungs=nonsense"], "nonsense"),
            ("ztt_jax.bench", ["--suite=compile,speed"], "speed")]
  # Refused before anything trains, although ztt alone is a good rung: a real `python -m`.
  real = ("ztt_jax.experiments.ablation", ["--task=multihop", "--rungs=ztt,vanila-4"], "vanila-4")
  proc = subprocess.Popen([sys.executable, "-m", real[0], *real[1]], cwd=ROOT, env=_ENV, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  server = subprocess.run([sys.executable, __file__, json.dumps([c[:2] for c in cases])], cwd=ROOT, env=_ENV,
                          capture_output=True, text=True, timeout=300)
  assert server.returncode == 0, server.stderr
  results = json.loads(server.stdout.strip().splitlines()[-1])
  results.append([proc.wait(timeout=300), proc.stderr.read()])
  bad = []
  for (module, args, names), (code, stderr) in zip(cases + [real], results):
    lines = stderr.strip().splitlines()
    if code != 2 or len(lines) != 1 or names not in lines[0]:
      bad.append(f"python -m {module} {' '.join(args)}: exit {code}, stderr:\n{stderr[-2000:]}")
  assert not bad, "\n\n".join(bad)


def _serve(cases) -> list:
  """[exit code, stderr] of `python -m MODULE ARGS...` for each (module, args), each in a forked
  child of this process, which has imported only third-party libraries (a ztt_jax module imported
  before runpy runs it as __main__ would make runpy warn)."""
  import runpy
  import absl.app  # noqa: F401
  import flax.linen  # noqa: F401
  import jax  # noqa: F401
  import ml_collections.config_flags  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  children = []
  for module, args in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(r)
      os.dup2(w, 2)
      os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
      sys.argv = [module, *args]
      code = 1
      try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # noqa: BLE001 - a traceback is what the test reports
        import traceback
        traceback.print_exc()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    os.close(w)
    children.append((pid, r))
  out = []
  for pid, r in children:
    with os.fdopen(r) as f:
      err = f.read()
    out.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err])
  return out


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))  # as `python -m` from the repository root
  print(json.dumps(_serve(json.loads(sys.argv[1]))))
