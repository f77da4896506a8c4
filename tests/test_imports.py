"""The import graph of the project's modules (the *.py files of the repository root): one way, imports at the top.

Every module has its place in LAYERS and imports only modules of lower layers (so no cycle); nothing imports the
scripts of the top layer (train.py among them: study.py runs it as a process); no project import hides inside a
function (where it would hide a cycle); the copyable files (sd_loss.py, grpo.py, pbsd.py, lora.py) import no project
module at all."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
COPYABLE = ("sd_loss", "grpo", "pbsd", "lora")
# The layers, bottom first: a module imports only modules of the layers below its own.
LAYERS = (
    {"sd_loss", "grpo", "pbsd", "lora", "grading", "data"},  # leaves: no project import
    {"prompts", "rollout"},  # the prompts (data, grading); the generation engines and scoring (lora)
    {"critic", "runtime"},  # the critic backends (prompts, rollout); models, checkpoints, sampling (rollout)
    {"exact_critic"},  # the exact arithmetic critic (critic)
    {"feedback"},  # the feedback forms and steps 1-4 of a step: problems to teacher inputs (critic, exact_critic)
    {"config", "report"},  # the run's options, problems and critic; the results table (feedback: names of the forms)
    {"mechanism"},  # the per-token advantage figure (config, feedback)
    {"evaluate", "diagnostics"},  # the metrics, a policy's evaluation, the results table; the step's log line
    # the scripts, which nothing imports: the training loop; the teacher's gap (feedback); the filter; the study,
    # which runs train.py as a process per run (config: its options)
    {"train", "teacher_gap", "filter_problems", "study"},
)
SCRIPTS = LAYERS[-1]


def imported_modules(node: ast.AST) -> set[str]:
    """Project modules named by an import statement (its top-level package name)."""
    if isinstance(node, ast.Import):
        names = {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = {node.module.split(".")[0]}
    else:
        names = set()
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
    assert {"train", "rollout", "config", "runtime", "grading", "prompts", "exact_critic", "mechanism", "report",
            *COPYABLE} <= MODULES.keys()


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
