"""The package's shape: imports flow one way between the roles of pipeline/ (no cycles, not even
through imports inside functions), and every DVC stage declares the project modules whose code
shapes its output (its script's transitive imports), except the infrastructure dvc.yaml exempts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from helpers import ROOT, dvc_stages, imported_packages

# Roles in the order imports may flow: a module imports its own role or an earlier one.
ROLES = [
    "schema",
    "infra",
    "quant",
    "models",
    "calibration",
    "method",
    "eval",
    "deploy",
    "resources",
    "params",
    "preflight",
    "api",
]
SCHEMA = {"pipeline.config", "pipeline.methods"}
SAME_TIER = {"eval": "deploy", "preflight": "api"}  # neither imports the other


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]
    return {module_name(path): path for path in files}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def role(module: str) -> str | None:
    if module in SCHEMA:
        return "schema"
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in ROLES else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_one_way_between_roles():
    wrong = []
    for module, imported in import_graph().items():
        own = role(module)
        if own is None:  # stages and the package root
            continue
        for target in imported:
            other = role(target)
            if other is None:
                wrong.append(f"{module} imports {target}, which no role owns")
            elif ROLES.index(other) > ROLES.index(own) or SAME_TIER.get(own) == other or SAME_TIER.get(other) == own:
                wrong.append(f"{module} ({own}) imports {target} ({other})")
    assert not wrong, "\n".join(sorted(wrong))


def exempt_from_code_deps() -> set[str]:
    """The modules dvc.yaml's header names as infrastructure that stages need not declare."""
    header = (ROOT / "dvc.yaml").read_text().split("\nstages:")[0]
    listed = re.search(r"code-deps-exempt:(.*?)(?:\n#\s*\n|\n[^#]|$)", header, re.S)
    assert listed, "dvc.yaml's header names no code-deps-exempt modules"
    return set(listed.group(1).replace("#", " ").split())


def test_every_stage_declares_exactly_the_modules_its_script_imports():
    graph, known = import_graph(), project_modules()
    exempt = exempt_from_code_deps()
    path_of = {name: path.relative_to(ROOT).as_posix() for name, path in known.items()}
    assert exempt <= set(path_of.values()), (
        f"dvc.yaml exempts files that do not exist: {exempt - set(path_of.values())}"
    )
    missing, extra = [], []
    for stage, spec in dvc_stages().items():
        spec = spec.get("do", spec)
        script = re.search(r"python -m (stages\.\w+)", spec["cmd"]).group(1)
        deps = [d.rstrip("/") for d in spec["deps"]]
        reached, todo = set(), [script]
        while todo:  # the script's transitive imports, not followed into exempt modules
            module = todo.pop()
            if module in reached or path_of[module] in exempt:
                continue
            reached.add(module)
            todo += graph[module]
        for module in sorted(reached):
            file = path_of[module]
            if module.endswith("__init__") or file.endswith("__init__.py") and module.count(".") == 0:
                continue
            if not any(file == d or file.startswith(d + "/") for d in deps):
                missing.append(f"{stage}: {file}")
        # a listed module the script does not import reruns the stage for nothing when it changes; a
        # package's __init__ runs when any of its modules is imported
        files = {path_of[module] for module in reached}
        files |= {file.rsplit("/", 1)[0] + "/__init__.py" for file in files}
        for dep in (d for d in deps if d.split("/")[0] in {"pipeline", "stages"}):
            if not any(file == dep or file.startswith(dep + "/") for file in files):
                extra.append(f"{stage}: {dep}")
    assert not missing, "stages import modules their deps do not list:\n" + "\n".join(missing)
    assert not extra, "stages list modules their scripts do not import:\n" + "\n".join(extra)


def test_the_always_run_stage_imports_no_torch():
    # eval_files runs on every `dvc repro`, so a no-op repro costs its imports
    assert not {"torch", "zarr", "diffusers"} & imported_packages("import stages.eval_files")


def test_no_always_run_stage_in_the_root_dvc_yaml():
    # DVC rewrites the lock of a stage that runs: an always-run stage in the root dvc.yaml would rewrite
    # its 13 000-line lock on every `dvc repro` (1.7 s of a 7.1-s no-op run); external/dvc.yaml's is 25 lines
    always = {name for name, spec in dvc_stages().items() if spec.get("always_changed")}
    root = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert always == {"eval_files"} and not always & set(root)


def test_the_metrics_stages_import_no_diffusers():
    # a dozen fid stages per repro: diffusers' import is seconds each, and they never build a model
    # (one process for both: its imports are seconds)
    assert "diffusers" not in imported_packages("import stages.fid, stages.report")
