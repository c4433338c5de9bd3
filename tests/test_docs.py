"""Every reference in the docs and in code comments resolves.

(a) `docs/NAME.md`, `docs/NAME.md §N` and `docs/NAME.md#anchor` (and the relative
Markdown links of README.md and docs/) name a file that exists and a heading in it;
(b) project paths exist: files named with their extension (srft_jax/step.py), and in
Markdown backticked paths (`srft_jax/model/`, `configs/default.py:grpo`);
(c) nothing outside the repository is cited (`NAME.md` files elsewhere, issue numbers);
(d) dotted project names resolve: every `srft_jax.x.Name`, and every backticked
`module.Name` whose `module` is a top-level module of srft_jax (`step.GroupLayout`,
`objectives.srft_loss(...)`), read from the source and, where it says no, by import
and getattr (config fields such as `lora.rank` are not module names).

The checkers take text, so `test_checkers_catch_broken_references` feeds them broken
references: they can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE_DIRS = ("srft_jax", "configs", "launch", "benchmarks", "tests")
CODE_SUFFIXES = {".py", ".sh", ".sbatch"}
# Paths under these roots must exist: a file named with its extension anywhere,
# and in Markdown any backticked path (`srft_jax/model/`).
PATH_ROOTS = ("srft_jax/", "configs/", "launch/", "benchmarks/", "tests/", "docs/")
# Paths that exist elsewhere than in the tree: the wheel's copy of configs/.
PATHS_ELSEWHERE = ("srft_jax/configs/",)
NAMES_ELSEWHERE = ("srft_jax.configs",)
# A backticked `stem.ext` is a file name, not a module attribute (`metrics.jsonl`).
FILE_EXTS = {"py", "json", "jsonl", "md", "txt", "png", "toml", "sh", "csv", "yaml", "parquet"}
FILE_EXTS |= {"egg", "whl", "model"}  # srft_jax.egg-info; sentencepiece's `tokenizer.model`
# Project modules named like the library they talk to: `peft.PeftModel` is the library's.
LIBRARY_TWINS = {"peft"}

DOC_REF = re.compile(
  r"(?<![\w/.])docs/(?P<doc>[\w.-]+\.md)"
  r"(?:#(?P<anchor>[\w-]+)|(?P<sections>\s*§\s*[\d.]*\d(?:\s*(?:,|-|–|and)\s*§\s*[\d.]*\d)*))?"
)
SECTION_NUM = re.compile(r"§\s*([\d.]*\d)")
MD_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
FULL_NAME = re.compile(r"(?<![\w/.-])srft_jax(?:\.\w+)+")
SHORT_NAME = re.compile(r"`(?P<mod>[a-z_]\w*)(?P<rest>(?:\.\w+)+)(?:\([^`]*\)|\[[^`]*\])?`")
BACKTICKED_PATH = re.compile(r"`(?P<path>(?:" + "|".join(PATH_ROOTS) + r")[\w./-]*)[^`]*`")
FILE_PATH = re.compile(
  r"(?<![\w/.-])(?P<path>(?:" + "|".join(PATH_ROOTS) + r")[\w/.-]*\.(?:py|sh|sbatch|md|txt|toml))\b"
)
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*(\.|/|$)")  # configs/NAME.py
# Citations a reader of the repository cannot follow: an issue tracker's numbers,
# and `NAME.md` files that are not in the repository.
ISSUE_REF = re.compile(r"\bissues?\s+#?\d+", re.I)
UPPER_MD = re.compile(r"(?<![\w/.-])[A-Z][A-Z_]+\.md\b")


def sources() -> list[pathlib.Path]:
  """README, docs/*.md, and the code, scripts and build files whose comments cite them."""
  out = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  out += [ROOT / "Makefile", ROOT / "pyproject.toml", *sorted(ROOT.glob("requirements*.txt"))]
  for d in CODE_DIRS:
    out += sorted(p for p in (ROOT / d).rglob("*") if p.suffix in CODE_SUFFIXES)
  return [p for p in out if "__pycache__" not in p.parts]


# ----------------------------------------------------------------------------
# Headings: GitHub's anchors and the docs' section numbers
# ----------------------------------------------------------------------------


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: Markdown marks dropped, lowercase,
  punctuation dropped, spaces to hyphens."""
  text = re.sub(r"`|\*\*|\*|__", "", heading).strip().lower()
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@dataclasses.dataclass(frozen=True)
class Headings:
  anchors: frozenset[str]
  sections: frozenset[str]  # "2", "2.1", ... from headings such as "## 2.1 SFT ..."


def headings_of(text: str) -> Headings:
  anchors, sections, seen = set(), set(), {}
  in_code = False
  for line in text.splitlines():
    if line.lstrip().startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not m:
      continue
    s = slug(m.group(1))
    n = seen.get(s, 0)
    seen[s] = n + 1
    anchors.add(s if n == 0 else f"{s}-{n}")  # GitHub numbers repeated headings
    if num := re.match(r"(\d+(?:\.\d+)*)\.?\s", m.group(1)):
      sections.add(num.group(1))
  return Headings(frozenset(anchors), frozenset(sections))


@functools.cache
def doc_headings(path: pathlib.Path) -> Headings | None:
  return headings_of(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------
# The checkers: text in, problems out
# ----------------------------------------------------------------------------


def _check_target(doc: pathlib.Path, anchor: str | None, sections: list[str], cited: str):
  heads = doc_headings(doc)
  if heads is None:
    return [f"{cited}: no such file"]
  out = []
  if anchor and anchor not in heads.anchors:
    out.append(f"{cited}: no heading with anchor #{anchor}")
  out += [f"{cited}: no section §{s}" for s in sections if s not in heads.sections]
  return out


def check_doc_refs(text: str, where: str, self_doc: pathlib.Path | None = None) -> list[str]:
  """`docs/NAME.md`, with `§N` / `#anchor`; in a doc, its bare `§N` name its own sections."""
  problems = []
  for m in DOC_REF.finditer(text):
    sections = SECTION_NUM.findall(m.group("sections") or "")
    problems += [
      f"{where}: {p}"
      for p in _check_target(ROOT / "docs" / m.group("doc"), m.group("anchor"), sections, m[0])
    ]
  if self_doc is not None:
    cited = {m.span("sections") for m in DOC_REF.finditer(text) if m.group("sections")}
    for m in SECTION_NUM.finditer(text):
      if not any(a <= m.start() < b for a, b in cited):
        problems += [f"{where}: {p}" for p in _check_target(self_doc, None, [m[1]], m[0])]
  return problems


def check_links(text: str, where: str, md_file: pathlib.Path) -> list[str]:
  """Relative Markdown links in `md_file`: `[x](docs/y.md#z)`, `[x](#z)`, `[x](y.md)`."""
  problems = []
  for m in MD_LINK.finditer(text):
    target = m.group("target")
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    doc = (md_file.parent / path).resolve() if path else md_file
    if doc.suffix != ".md":
      if not doc.exists():
        problems.append(f"{where}: link {target}: no such file")
      continue
    problems += [f"{where}: link {p}" for p in _check_target(doc, anchor or None, [], target)]
  return problems


def check_paths(text: str, where: str, markdown: bool = True) -> list[str]:
  """Project paths exist: `srft_jax/step.py` anywhere; in Markdown also backticked
  directories and `configs/default.py:grpo`."""
  found = [m.group("path") for m in FILE_PATH.finditer(text)]
  if markdown:
    found += [m.group("path") for m in BACKTICKED_PATH.finditer(text) if "*" not in m[0]]
  problems = []
  for path in sorted({p.rstrip(".") for p in found}):
    if path.startswith(PATHS_ELSEWHERE) or PLACEHOLDER.search(path):
      continue
    if not (ROOT / path).exists():
      problems.append(f"{where}: {path}: no such file or directory")
  return problems


def check_outside_refs(text: str, where: str) -> list[str]:
  """The docs and comments cite the project's own files, never what lies outside it."""
  problems = [
    f"{where}: {m[0]!r}: an issue tracker, outside the repo" for m in ISSUE_REF.finditer(text)
  ]
  for m in UPPER_MD.finditer(text):
    if not (ROOT / m[0]).is_file() and not (ROOT / "docs" / m[0]).is_file():
      problems.append(f"{where}: {m[0]}: not in the repository")
  return problems


@functools.cache
def top_level_modules() -> frozenset[str]:
  pkg = ROOT / "srft_jax"
  mods = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_")}
  mods |= {p.parent.name for p in pkg.glob("*/__init__.py")}
  return frozenset(mods)


@functools.cache
def default_config():
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def is_config_field(dotted: str) -> bool:
  """`data.tokenizer`, `lora.rank`: a field of configs/default.py, not a module attribute."""
  node = default_config()
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def module_file(dotted: str) -> pathlib.Path | None:
  base = ROOT.joinpath(*dotted.split("."))
  for f in (base / "__init__.py", base.with_suffix(".py")):
    if f.is_file():
      return f
  return None


def _class_attributes(cls: ast.ClassDef) -> set[str]:
  """What a class defines, declares (fields) or sets on its instances (`self.x = ...`)."""
  out = set()
  for node in ast.walk(cls):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      out.add(node.name)
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    for t in targets:
      if isinstance(t, ast.Name):
        out.add(t.id)
      elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
        out.add(t.attr)
  return out


@functools.cache
def module_names(path: pathlib.Path) -> dict:
  """A module's top-level names -> its ClassDef or FunctionDef, a project name it
  imports ("srft_jax.x.Name"), or None (a value, another library's name)."""
  out = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out.setdefault(node.name, node)
    elif isinstance(node, ast.ClassDef):
      out.setdefault(node.name, node)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
        for n in ast.walk(t):
          if isinstance(n, ast.Name):
            out.setdefault(n.id, None)
    elif isinstance(node, ast.Import):
      for a in node.names:
        out.setdefault(a.asname or a.name.split(".")[0], a.name if a.asname else None)
    elif isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        out.setdefault(a.asname or a.name, f"{node.module}.{a.name}")
  return {k: v for k, v in out.items() if not isinstance(v, str) or v.startswith("srft_jax")}


def resolves_statically(dotted: str, depth: int = 0) -> bool:
  """Whether `srft_jax.a.b.C.d` names something, read from the source (nothing
  imported): modules, their top-level names, re-exports, class attributes."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    if (f := module_file(".".join(parts[:i]))) is not None:
      break
  else:
    return False
  rest = parts[i:]
  if not rest:
    return True
  names = module_names(f)
  if rest[0] not in names:
    return False
  target = names[rest[0]]
  if isinstance(target, str):  # a project name imported here: resolve it where it lives
    return depth < 8 and resolves_statically(".".join([target, *rest[1:]]), depth + 1)
  if len(rest) == 1:
    return True
  # A class's attribute; anything deeper, or a value's attribute, is left to import.
  return (
    isinstance(target, ast.ClassDef) and len(rest) == 2 and rest[1] in _class_attributes(target)
  )


@functools.cache
def resolve(dotted: str) -> str | None:
  """None if `srft_jax.a.b.C.d` resolves, else why not: read from the source
  first (fast), and confirmed by import and getattr (the longest importable
  prefix, then attributes, dataclass fields included) where the source says no."""
  if resolves_statically(dotted):
    return None
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError as e:
      if e.name is not None and not dotted.startswith(e.name):
        return f"importing {'.'.join(parts[:i])}: {e}"
      continue
    for j, attr in enumerate(parts[i:], start=i):
      fields = getattr(obj, "__dataclass_fields__", {})
      if hasattr(obj, attr):
        obj = getattr(obj, attr)
      elif attr in fields and j == len(parts) - 1:
        return None
      else:
        return f"{'.'.join(parts[:j])} has no attribute {attr}"
    return None
  return "not importable"


def instance_attribute(module: str, attr: str) -> bool:
  """`trainer.spec` where `trainer` is a Trainer: an attribute a class of `module`
  sets on its instances (`self.spec = ...`) or declares (a field)."""
  f = module_file(f"srft_jax.{module}")
  classes = [c for c in module_names(f).values() if isinstance(c, ast.ClassDef)] if f else []
  return any(attr in _class_attributes(c) for c in classes)


def check_names(text: str, where: str) -> list[str]:
  problems = []
  full = {m[0].rstrip(".") for m in FULL_NAME.finditer(text)}
  full = {n for n in full if n.rsplit(".", 1)[-1] not in FILE_EXTS}
  for name in sorted(n for n in full if not n.startswith(NAMES_ELSEWHERE)):
    if why := resolve(name):
      problems.append(f"{where}: {name}: {why}")
  for m in SHORT_NAME.finditer(text):
    mod, rest = m.group("mod"), m.group("rest")
    if mod not in top_level_modules() or is_config_field(mod + rest):
      continue
    if rest.rsplit(".", 1)[-1] in FILE_EXTS or not (why := resolve(f"srft_jax.{mod}{rest}")):
      continue
    if mod in LIBRARY_TWINS or instance_attribute(mod, rest.split(".")[1]):
      continue
    problems.append(f"{where}: `{mod}{rest}` (srft_jax.{mod}{rest}): {why}")
  return problems


def prose(path: pathlib.Path) -> str:
  """What a file says to its reader: a Python file's comments and docstrings
  (its code runs, and its strings may name anything); any other file whole."""
  if path.suffix != ".py":
    return path.read_text()
  out, previous = [], tokenize.NEWLINE
  with path.open("rb") as f:
    for tok in tokenize.tokenize(f.readline):
      if tok.type == tokenize.COMMENT:
        out.append(tok.string)
      elif tok.type == tokenize.STRING and previous in (
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
      ):
        out.append(tok.string)  # a statement of its own: a docstring
      if tok.type not in (tokenize.NL, tokenize.COMMENT):
        previous = tok.type
  return "\n".join(out)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def _rel(p: pathlib.Path) -> str:
  return str(p.relative_to(ROOT))


def test_doc_references_resolve():
  problems = []
  for p in sources():
    if p == pathlib.Path(__file__):  # its broken examples are the point
      continue
    text = p.read_text()
    self_doc = p if p.parent == ROOT / "docs" else None
    problems += check_doc_refs(text, _rel(p), self_doc)
    problems += check_paths(prose(p), _rel(p), markdown=p.suffix == ".md")
    problems += check_outside_refs(prose(p), _rel(p))
    if p.suffix == ".md":
      problems += check_links(text, _rel(p), p)
  assert not problems, "\n".join(problems)


def test_project_names_resolve():
  problems = []
  for p in sources():
    if p != pathlib.Path(__file__):  # its broken examples are the point
      problems += check_names(prose(p), _rel(p))
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
  "broken",
  [
    "see docs/nowhere.md",
    "(docs/method.md §99)",
    "docs/method.md §2, §98",
    "[x](docs/benchmarks.md#no-such-heading)",
    "[x](docs/nowhere.md)",
    "`srft_jax/no_such_module.py`",
    "# see srft_jax/nowhere.py",
    "# see ENV.md",
    "(issue 6)",
    "`srft_jax/no_such_package/`",
    "`srft_jax.step.NoSuchLayout`",
    "`srft_jax.no_such_module`",
    "`step.NoSuchLayout`",
    "`objectives.srft_loss.no_such(...)`",
  ],
)
def test_checkers_catch_broken_references(broken):
  """The same checkers on a broken reference: each is reported; its fix is not."""
  here = "broken"

  def found(text):
    return (
      check_doc_refs(text, here)
      + check_links(text, here, ROOT / "README.md")
      + check_paths(text, here)
      + check_outside_refs(text, here)
      + check_names(text, here)
    )

  assert found(broken), broken
  assert not found(
    "docs/method.md §2.1, §4 and [x](docs/benchmarks.md#make-run); "
    "`srft_jax/step.py`, `srft_jax.step.GroupLayout.demos_in_group`, `step.GroupLayout`, "
    "`objectives.srft_loss(...)`, `logs/metrics.jsonl`, `metrics.jsonl`"
  )


def test_anchor_slugs_match_github():
  heads = headings_of(
    "## 15. Qwen3, Qwen3-MoE and where the experts live\n## Packaging: the jax range\n"
    "### `make run` (CPU)\n## Figures\n## Figures\n```\n# not a heading\n```\n"
  )
  assert heads.anchors == {
    "15-qwen3-qwen3-moe-and-where-the-experts-live",
    "packaging-the-jax-range",
    "make-run-cpu",
    "figures",
    "figures-1",
  }
  assert heads.sections == {"15"}
