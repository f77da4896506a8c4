"""The import graph of the project's modules: one way, imports at the top, and the tree a reader opens.

The modules are the *.py files of the root (the paper's path), of infra/ (the run's plumbing), demo/ (the demo's
stand-ins) and scripts/ (the analyses), named as they are imported ("infra.dist"). Every module has its place in
LAYERS and imports only modules of lower layers (so no cycle); nothing imports a script (train.py and scripts/);
no project import hides inside a function (where it would hide a cycle); the copyable files (sd_loss.py, grpo.py,
pbsd.py, lora.py) import no project module at all; the root holds at most 14 modules of at most 500 lines, none of
them plumbing or an analysis, and the folders are one level deep."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("infra", "demo", "scripts")
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))} | {
    f"{folder}.{p.stem}": p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))
    if p.stem != "__init__"}
COPYABLE = ("sd_loss", "grpo", "pbsd", "lora")
# The layers, bottom first: a module imports only modules of the layers below its own.
LAYERS = (
    # leaves: no project import. The math, grading, data; ranks; the hardened HTTP client
    {"sd_loss", "grpo", "pbsd", "lora", "grading", "data", "infra.dist", "infra.chat_client"},
    # the prompts (data, grading); the engines and scoring (lora); logs and the out-dir's file guard, signals
    # (ranks); the demo's arithmetic problems (data)
    {"prompts", "rollout", "infra.logs", "infra.signals", "demo.arithmetic"},
    # the critic (prompts, rollout, the client); the policy (lora, rollout); the stop rules (prompts: the probe);
    # checkpoints (lora, the file guard of logs); the run's fingerprints (data, rollout: the demo model's folder);
    # samples.jsonl (logs)
    {"critic", "policy", "infra.stop_rules", "infra.checkpoint", "infra.fingerprint", "infra.sample_log"},
    # the exact arithmetic critic (critic); the checks of a run's files (fingerprint, checkpoint, grading)
    {"demo.exact_critic", "infra.checks"},
    {"feedback"},  # the feedback forms and steps 1-4 of a step: problems to teacher inputs (critic, exact critic)
    # the options, problems and critic of a run (feedback); the step's log line; the results table (feedback)
    {"config", "infra.diagnostics", "infra.report"},
    # a policy's evaluation (config, policy); the bookkeeping after a step (diagnostics, stop rules)
    {"evaluate", "infra.bookkeeping"},
    # the scripts, which nothing imports: the training loop; the analyses (the study runs train.py as a process)
    {"train", "scripts.teacher_gap", "scripts.filter_problems", "scripts.study", "scripts.mechanism"},
)
SCRIPTS = LAYERS[-1]
ROOT_MAX_MODULES, ROOT_MAX_LINES = 14, 500


def imported_modules(node: ast.AST) -> set[str]:
    """Project modules named by an import statement: `import a.b`, `from a.b import c`, `from a import b` (b a
    module), each as its dotted name."""
    names = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        raise AssertionError("a relative import: the project imports by absolute names")
    return names & MODULES.keys()


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(project modules imported at module level, those imported inside a function body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, inside = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            (inside if in_function else top).update(imported_modules(child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inside


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_modules_are_found():
    assert {"train", "rollout", "config", "policy", "grading", "prompts", "demo.exact_critic", "scripts.mechanism",
            "infra.report", "infra.checkpoint", *COPYABLE} <= MODULES.keys()


def test_each_module_has_one_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert sorted(placed) == sorted(MODULES), "place each module in one layer of LAYERS"


def test_each_module_imports_only_lower_layers():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = {f"{name} (layer {level[name]}) imports {dep} (layer {level[dep]})"
              for name, (top, inside) in GRAPH.items() for dep in top | inside if level[dep] >= level[name]}
    assert upward == set()


def test_nothing_imports_a_script():
    found = {(name, dep) for name, (top, inside) in GRAPH.items() for dep in top | inside if dep in SCRIPTS}
    assert found == set(), "a script (train.py, study.py, ...) is imported; move what is shared into a module below"


def test_no_project_import_inside_a_function():
    found = {(name, dep) for name, (_, inside) in GRAPH.items() for dep in inside}
    assert found == set()


def test_the_import_graph_has_no_cycle():
    edges = {name: top | inside for name, (top, inside) in GRAPH.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def walk(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(edges[name]):
            if state.get(dep) == "open":
                chain = path + [name]
                raise AssertionError("import cycle: " + " -> ".join(chain[chain.index(dep):] + [dep]))
            if dep not in state:
                walk(dep, path + [name])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            walk(name, [])


def test_the_copyable_files_import_no_project_module():
    for name in COPYABLE:
        top, inside = GRAPH[name]
        assert top | inside == set(), f"{name}.py imports {sorted(top | inside)}"


def test_the_root_is_the_paper():
    """At most 14 modules at the root, each at most 500 lines: the paper's path; the rest in one-level folders."""
    root = [p for p in sorted(ROOT.glob("*.py"))]
    assert len(root) <= ROOT_MAX_MODULES, [p.name for p in root]
    long = {p.name: n for p in root if (n := len(p.read_text().splitlines())) > ROOT_MAX_LINES}
    assert long == {}
    for folder in FOLDERS:
        assert (ROOT / folder / "__init__.py").read_text().startswith('"""'), f"{folder}/ says what it holds"
        assert not [p for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_the_scripts_run_as_modules_from_the_root():
    """Each analysis in scripts/ has a main guard (python -m scripts.NAME) and a docstring naming that command."""
    for name in sorted(m for m in MODULES if m.startswith("scripts.")):
        text = MODULES[name].read_text()
        assert 'if __name__ == "__main__":' in text, name
        assert f"python -m {name}" in ast.get_docstring(ast.parse(text)), name
