"""The README and the guides under docs/ stay true to the tree: links resolve, named modules exist,
and the README stays a front door. Pure Python: reads files, imports nothing of ztt_jax."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README_MAX_LINES = 200

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_MODULE = re.compile(r"python -m (ztt_jax(?:\.\w+)*)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
  """The text outside fenced code blocks (a link inside one is not a link)."""
  out, fenced = [], False
  for line in text.splitlines():
    if _FENCE.match(line.lstrip()):
      fenced = not fenced
    elif not fenced:
      out.append(line)
  return "\n".join(out)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  seen: dict[str, int] = {}
  anchors = set()
  for line in _prose(path.read_text(encoding="utf-8")).splitlines():
    m = re.match(r"#{1,6}\s+(.*)", line)
    if m:
      slug = _slug(m.group(1))
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


def _links(path: pathlib.Path):
  for target in _LINK.findall(_prose(path.read_text(encoding="utf-8"))):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
      continue
    yield target


def _rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc):
  broken = []
  for target in _links(doc):
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    if not dest.exists():
      broken.append(f"{target} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(f"{target} (no heading #{anchor} in {_rel(dest)})")
  assert not broken, f"{_rel(doc)} has broken links: {broken}"


def _module_exists(name: str) -> bool:
  base = ROOT.joinpath(*name.split("."))
  return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_named_modules_exist(doc):
  named = set(_MODULE.findall(doc.read_text(encoding="utf-8")))
  missing = sorted(m for m in named if not _module_exists(m))
  assert not missing, f"{_rel(doc)} runs modules that do not exist: {missing}"


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it <= {README_MAX_LINES} and move detail to docs/"


def test_the_checks_see_something():
  """Guards the regexes: the README links the guides and runs the training module."""
  readme = ROOT / "README.md"
  assert "docs/training.md" in list(_links(readme))
  assert "ztt_jax.train" in _MODULE.findall(readme.read_text(encoding="utf-8"))
  assert "training" in _anchors(ROOT / "docs" / "training.md")
