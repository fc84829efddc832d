"""Imports go one way: base modules <- data <- flow <- motion/augment/losses <- models <- train <- eval
<- entry points. Every `mscl_stream` import in the package and kernels/ (module level and inside
functions) is read from the source with `ast`; an import of a higher layer fails the test, except
the known ones listed below, which are debts to pay off (each with its reason), not permissions.
"""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower numbers are imported by higher ones, never the other way. A module is placed by its longest
# dotted prefix listed here, so a few modules sit apart from their package:
# - kernels/ holds the fused kernels of two layers: flow's (corr_lookup, tvl1, which import nothing of
#   the package) sit below flow; the motion and augment kernels sit above the two small modules they
#   read (motion.wheel: the colour-wheel tables; augment.params: the parameter-table layout) and below
#   the motion and augment modules that dispatch to them.
# An import names a module: `from mscl_stream.motion import x` is the motion package (its __init__
# imports every motion module), `from mscl_stream.motion.wheel import x` only the wheel module.
LAYERS = {
    "errors": 0, "progress": 0, "machine": 0, "config": 0, "distributed": 0, "geometry": 0,
    "data": 1,
    "kernels.corr_lookup": 2, "kernels.tvl1": 2,
    "flow": 3,
    "motion.wheel": 4, "augment.params": 4,
    "kernels": 5,
    "motion": 6, "augment": 6, "losses": 6,
    "models": 7,
    "train": 8,
    "eval": 9,
    "commands": 10, "demo": 10, "cli": 11,
}

# Known upward imports, to be removed (see the house issue): importer module -> imported module.
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["mscl_stream", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_key(module: str) -> str | None:
    """The LAYERS entry that places ``module``: its longest dotted prefix (below mscl_stream) listed there."""
    parts = module.split(".")
    if parts[0] != "mscl_stream":
        return None
    for n in range(len(parts), 1, -1):
        key = ".".join(parts[1:n])
        if key in LAYERS:
            return key
    return None


def layer(module: str) -> int | None:
    key = layer_key(module)
    return None if key is None else LAYERS[key]


def sources() -> list[Path]:
    return sorted([*(ROOT / "mscl_stream").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


@functools.cache
def all_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in sources())


def imports(path: Path) -> set[str]:
    """Every mscl_stream module ``path`` imports; ``from pkg import name`` counts as ``pkg.name`` when that
    is a module (``from mscl_stream import motion``, ``from mscl_stream.kernels import tvl1``), else ``pkg``."""
    modules = all_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mscl_stream":       # `from mscl_stream import motion`
                found |= {f"mscl_stream.{a.name}" for a in node.names}
            elif node.module.startswith("mscl_stream."):
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found |= (subs & modules) | ({node.module} if subs - modules else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mscl_stream.")}
    return found


def against_order(me: str, targets: set[str]) -> set[tuple[str, str]]:
    """(me, the imported module's LAYERS entry as a module name) for every target above ``me``."""
    mine = layer(me)
    return {(me, f"mscl_stream.{layer_key(t)}") for t in targets
            if mine is not None and layer(t) is not None and layer(t) > mine}


def upward_imports() -> set[tuple[str, str]]:
    """(importing module, imported LAYERS entry) for every import against the order."""
    out = set()
    for path in sources():
        out |= against_order(module_name(path), imports(path))
    return out


def test_every_package_module_has_a_layer():
    unplaced = sorted(m for m in map(module_name, sources()) if "." in m and layer_key(m) is None)
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_every_finer_layer_entry_names_a_module():
    # a per-module entry whose module moved would silently stop placing anything
    modules = {module_name(p) for p in sources()}
    stale = sorted(k for k in LAYERS if "." in k and f"mscl_stream.{k}" not in modules)
    assert not stale, f"LAYERS entries naming no module: {stale}"


def test_no_new_upward_import():
    new = sorted(upward_imports() - KNOWN)
    assert not new, "imports against the layer order (data <- flow <- motion <- models <- train <- cli): " + \
        ", ".join(f"{a} -> {b}" for a, b in new)


def test_known_debts_still_exist():
    # a paid-off debt must leave the list, so the list never hides a new import of the same kind
    stale = sorted(KNOWN - upward_imports())
    assert not stale, f"remove from KNOWN (no longer imported): {stale}"


def test_checker_sees_upward_and_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from mscl_stream.config import Config\n"
                   "def f():\n    from mscl_stream.train.trainer import pretrain\n"
                   "    from mscl_stream import motion\n"
                   "    from mscl_stream.kernels import tvl1\n")
    assert imports(src) == {"mscl_stream.config", "mscl_stream.train.trainer", "mscl_stream.motion",
                            "mscl_stream.kernels.tvl1"}
    assert layer("mscl_stream.train.trainer") > layer("mscl_stream.data.loader")


def test_checker_places_modules_by_their_longest_listed_prefix():
    # flow's kernels below flow, the motion kernels above the wheel tables and below the motion package
    assert layer("mscl_stream.kernels.corr_lookup") < layer("mscl_stream.flow.raft")
    assert layer("mscl_stream.motion.wheel") < layer("mscl_stream.kernels.flow_encode") < layer("mscl_stream.motion")
    assert layer("mscl_stream.motion.views") == layer("mscl_stream.motion")
    kernel = "mscl_stream.kernels.flow_views"
    assert against_order(kernel, {"mscl_stream.motion.wheel", "mscl_stream.augment.params"}) == set()
    # the package (its __init__ imports every motion module) and a sibling module are above a kernel
    assert against_order(kernel, {"mscl_stream.motion", "mscl_stream.motion.views"}) == {
        (kernel, "mscl_stream.motion")}
    assert against_order("mscl_stream.flow.raft", {"mscl_stream.kernels.flow_encode"}) == {
        ("mscl_stream.flow.raft", "mscl_stream.kernels")}


# Known pairs of modules that import each other (one side lazily), to be removed like KNOWN.
KNOWN_MUTUAL: set[frozenset[str]] = set()


def test_no_new_pair_of_modules_importing_each_other():
    graph = {module_name(p): imports(p) for p in sources()}
    mutual = {frozenset({a, b}) for a, deps in graph.items() for b in deps if a != b and a in graph.get(b, ())}
    new = mutual - KNOWN_MUTUAL
    assert not new, f"modules importing each other: {sorted(sorted(m) for m in new)}"
    assert KNOWN_MUTUAL <= mutual, "a known mutual import is gone: remove it from KNOWN_MUTUAL"


def test_every_module_says_what_it_holds():
    # the first docstring line is what a newcomer reads in a file listing or `help()`
    missing = [str(p.relative_to(ROOT)) for p in sources()
               if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, f"modules without a docstring saying what they hold: {missing}"
