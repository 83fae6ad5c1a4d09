"""The structure the folder listing promises: no import cycles anywhere in capstriton, the
kernels never import the library above them, the routing packages mirror each other, and the
routing registry imports no algorithm."""
from tests.helpers import REPO
from tests.helpers.imports import cycles, import_graph, longest_chain, module_files


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_planted_cycle_is_found(tmp_path):
    for folder in ("capstriton", "kernels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "capstriton" / "a.py").write_text("from .b import x\n")
    (tmp_path / "capstriton" / "b.py").write_text("def f():\n    from .a import y\n")  # inside a function
    assert cycles(import_graph(tmp_path)) == [["capstriton.a", "capstriton.b"]]


def test_kernels_never_import_the_library():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if not t.startswith("capstriton.kernels"))
              for m, targets in graph.items() if m.startswith("capstriton.kernels")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_registry_imports_no_algorithm():
    assert import_graph()["capstriton.routing.registry"] <= {"capstriton.routing.registry"}


def test_routing_packages_mirror_each_other():
    kernel_side = {p.stem for p in (REPO / "kernels" / "routing").glob("*.py")}
    library_side = {p.stem for p in (REPO / "capstriton" / "routing").glob("*.py")}
    algorithms = {"dynamic", "self_attention", "inverted_attention", "couplings"}
    assert algorithms <= kernel_side and algorithms <= library_side


def test_import_depth_is_reported():
    chain = longest_chain(import_graph())
    assert len(chain) >= 3 and len(module_files()) > 20  # the graph is read, not empty
