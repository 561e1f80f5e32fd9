"""The package's layering: imports run one way, from the CLI down to the operators (docs/architecture.md).

Every module of qsparse_jax and pallas_kernels is parsed, and each import it makes (at module level or inside a
function) becomes an edge of a module graph. The test fails on a cycle in that graph, on an import of a layer above
the importer's own, and on a function-level import of our own code outside the CLI (the one place allowed to import
a subcommand's machinery when it runs, so that `qsparse --help` starts fast).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom to top: a module may import its own layer and the layers below it. "config" is qsparse_jax/config.py (the
# run config, gathering the model's, data's and mesh's frozen configs with the training one); "" is the package root.
LAYERS = ("ops", "pallas_kernels", "parallel", "nn", "hf", "data", "config", "training", "inference", "research",
          "cli")
ROOT_MAY_IMPORT = ("ops",)  # qsparse_jax/__init__.py re-exports the operators, and nothing heavier


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in ("qsparse_jax", "pallas_kernels"):
    for path in sorted((ROOT / package).rglob("*.py")):
      found[module_name(path)] = path
  return found


def layer(module: str) -> str:
  """The layer of a module: pallas_kernels, the subpackage (or top-level module) of qsparse_jax, or "" (the root)."""
  parts = module.split(".")
  if parts[0] == "pallas_kernels":
    return "pallas_kernels"
  return parts[1] if len(parts) > 1 else ""


def imports(module: str, path: pathlib.Path, known: dict[str, pathlib.Path]):
  """(imported module, line, inside a function) for each import of our own modules in the file, resolved to the
  modules that run: `from a.b import c` runs a.b.c when that is a module, else a.b; packages above the target run
  too unless they contain the importer (Python is already initialising those)."""
  tree = ast.parse(path.read_text(), str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(child) for child in ast.walk(node) if child is not node)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    else:
      continue
    for target in targets:
      if target.split(".")[0] not in ("qsparse_jax", "pallas_kernels"):
        continue
      while target not in known:  # an attribute, not a module
        target = target.rpartition(".")[0]
      parts = target.split(".")
      for i in range(1, len(parts) + 1):
        ran = ".".join(parts[:i])
        if i < len(parts) and (module == ran or module.startswith(ran + ".")):
          continue  # a package containing the importer
        yield ran, node.lineno, id(node) in in_function


def upward_imports(edges) -> list[str]:
  """"module:line imports target" for each import of a layer above the importer's."""
  found = []
  for module, targets in edges.items():
    here = layer(module)
    for target, line, _ in targets:
      there = layer(target)
      if here == "":
        allowed = there in ROOT_MAY_IMPORT or target == "qsparse_jax"
      else:
        allowed = there == "" or LAYERS.index(there) <= LAYERS.index(here)
      if not allowed:
        found.append(f"{module}:{line} ({here or 'root'}) imports {target} ({there})")
  return found


def function_level_imports(edges) -> list[str]:
  return sorted({f"{m}:{line} imports {t}" for m, targets in edges.items() for t, line, in_function in targets
                 if in_function and layer(m) != "cli"})


def import_cycles(edges) -> list[list[str]]:
  """The cycles a depth-first search closes with a back edge (each as its modules, first repeated at the end)."""
  adjacency = {m: sorted({t for t, _, _ in targets if t != m}) for m, targets in edges.items()}
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in adjacency.get(node, ()):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(adjacency):
    if node not in state:
      visit(node)
  return cycles


@pytest.fixture(scope="module")
def edges():
  known = modules()
  return {m: list(imports(m, p, known)) for m, p in known.items()}


def test_every_module_is_in_a_declared_layer():
  unknown = sorted(m for m in modules() if layer(m) not in LAYERS + ("",))
  assert not unknown, f"modules outside the declared layers {LAYERS}: {unknown}"


def test_imports_point_down(edges):
  upward = upward_imports(edges)
  assert not upward, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_function_level_imports_of_our_code_outside_the_cli(edges):
  inside = function_level_imports(edges)
  assert not inside, "function-level imports (move them to the top of the module):\n" + "\n".join(inside)


def test_no_import_cycles(edges):
  cycles = import_cycles(edges)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_a_planted_cycle(tmp_path):
  """A planted package where ops imports training inside a function and training imports ops: each check fires."""
  known = {"qsparse_jax": tmp_path / "__init__.py", "qsparse_jax.ops": tmp_path / "ops" / "__init__.py",
           "qsparse_jax.ops.sparsity": tmp_path / "ops" / "sparsity.py",
           "qsparse_jax.training": tmp_path / "training" / "__init__.py",
           "qsparse_jax.training.loop": tmp_path / "training" / "loop.py"}
  sources = {"qsparse_jax.ops.sparsity": "import jax\n\ndef f():\n  from qsparse_jax.training import loop\n",
             "qsparse_jax.training.loop": "from qsparse_jax.ops.sparsity import f\n"}
  for name, path in known.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sources.get(name, ""))
  planted = {m: list(imports(m, p, known)) for m, p in known.items()}
  assert planted["qsparse_jax.training.loop"] == [("qsparse_jax.ops", 1, False), ("qsparse_jax.ops.sparsity", 1, False)]
  assert upward_imports(planted) == ["qsparse_jax.ops.sparsity:4 (ops) imports qsparse_jax.training (training)",
                                     "qsparse_jax.ops.sparsity:4 (ops) imports qsparse_jax.training.loop (training)"]
  assert function_level_imports(planted) == ["qsparse_jax.ops.sparsity:4 imports qsparse_jax.training",
                                             "qsparse_jax.ops.sparsity:4 imports qsparse_jax.training.loop"]
  assert import_cycles(planted) == [["qsparse_jax.ops.sparsity", "qsparse_jax.training.loop",
                                     "qsparse_jax.ops.sparsity"]]
