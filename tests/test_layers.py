"""Imports go one way: base modules <- data <- flow <- motion/augment/losses <- models <- train <- eval
<- entry points. Every `mscl_stream` import in the package and kernels/ (module level and inside
functions) is read from the source with `ast`; an import of a higher layer fails the test, except
the known ones listed below, which are debts to pay off (each with its reason), not permissions.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower numbers are imported by higher ones, never the other way.
LAYERS = {
    "errors": 0, "progress": 0, "machine": 0, "config": 0, "distributed": 0,
    "data": 1,
    "flow": 2,
    "kernels": 3, "motion": 3, "augment": 3, "losses": 3,
    "models": 4,
    "train": 5,
    "eval": 6,
    "commands": 7, "ablate": 7, "demo": 7, "cli": 8,
}

# Known upward imports, to be removed (see the house issue): importer module -> imported module.
KNOWN = {
    # index-time MDS scores videos with a flow estimator and the motion ops: belongs in one MDS module
    # above flow and motion, called by the `index` command
    ("mscl_stream.data.probe", "mscl_stream.flow"),
    ("mscl_stream.data.probe", "mscl_stream.motion"),
    # flow-check is a command (PNG colour wheel from motion), not part of the estimator library
    ("mscl_stream.flow.check", "mscl_stream.motion"),
    # RAFT's and TV-L1's fused kernels live in kernels/, which also holds the motion kernels
    ("mscl_stream.flow.raft", "mscl_stream.kernels"),
    ("mscl_stream.flow.tvl1", "mscl_stream.kernels"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["mscl_stream", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mscl_stream" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mscl_stream":       # `from mscl_stream import motion`
                found |= {f"mscl_stream.{a.name}" for a in node.names}
            elif node.module.startswith("mscl_stream."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mscl_stream.")}
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / "mscl_stream").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


def upward_imports() -> set[tuple[str, str]]:
    """(importing module, imported top-level package module) for every import against the order."""
    out = set()
    for path in sources():
        me = module_name(path)
        mine = layer(me)
        for target in imports(path):
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                out.add((me, ".".join(target.split(".")[:2])))
    return out


def test_every_package_module_has_a_layer():
    tops = {module_name(p).split(".")[1] for p in sources() if "." in module_name(p)}
    assert tops <= set(LAYERS), f"place these in LAYERS: {sorted(tops - set(LAYERS))}"


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
                   "    from mscl_stream import motion\n")
    assert imports(src) == {"mscl_stream.config", "mscl_stream.train.trainer", "mscl_stream.motion"}
    assert layer("mscl_stream.train.trainer") > layer("mscl_stream.data.loader")


# Known pairs of modules that import each other (one side lazily), to be removed like KNOWN.
KNOWN_MUTUAL = {
    # the manifest checks clip lengths with the sampler's clip_span; the sampler reads VideoRecord
    frozenset({"mscl_stream.data.manifest", "mscl_stream.data.sampler"}),
    # the kernels read the parameter-table layout (COL_*) and the wheel tables from the modules that
    # dispatch to them: both belong in small modules below the two
    frozenset({"mscl_stream.augment", "mscl_stream.kernels.augment_rgb"}),
    frozenset({"mscl_stream.motion", "mscl_stream.kernels.flow_encode"}),
}


def test_no_new_pair_of_modules_importing_each_other():
    graph = {module_name(p): imports(p) for p in sources()}
    mutual = {frozenset({a, b}) for a, deps in graph.items() for b in deps if a != b and a in graph.get(b, ())}
    new = mutual - KNOWN_MUTUAL
    assert not new, f"modules importing each other: {sorted(sorted(m) for m in new)}"
    assert KNOWN_MUTUAL <= mutual, "a known mutual import is gone: remove it from KNOWN_MUTUAL"
