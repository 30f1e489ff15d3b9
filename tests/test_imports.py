"""The package's modules import each other one way: no module imports one
that (directly or not) imports it back, so each reads without the other."""

import ast
import pathlib

import bnfree_jax

PACKAGE = pathlib.Path(bnfree_jax.__file__).parent


def _module(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path, modules):
  """The package's modules that `path` imports, anywhere in it (a function's
  deferred import too), packages themselves left out."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return {n for n in names if n in modules and modules[n].name != '__init__.py'}


def import_graph():
  modules = {_module(p): p for p in PACKAGE.rglob('*.py')}
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_the_graph_sees_deferred_imports():
  graph = import_graph()
  assert 'bnfree_jax.input_tfds' in graph['bnfree_jax.input_pipeline']  # In _tfds().
  assert 'bnfree_jax.train' in graph['bnfree_jax.main']  # In run().


def test_no_import_cycles():
  graph = import_graph()
  cycles = []

  def visit(name, path):
    for dep in sorted(graph[name]):
      if dep in path:
        cycles.append(path[path.index(dep):] + [dep])
      else:
        visit(dep, path + [dep])

  for name in graph:
    visit(name, [name])
  assert not cycles, cycles
