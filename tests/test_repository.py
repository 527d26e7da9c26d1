"""The repository keeps its promises: README commands are CI's, docs match the code, the package's structure."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_setup_commands():
    text = (REPO / "README.md").read_text()
    assert text.index("```bash") < text.index("\n## ")
    install_and_run, install_and_test = readme_commands()
    assert install_and_run.endswith("python examples/train.py")
    assert install_and_test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == readme_commands()[1]


PACKAGE = REPO / "dpt_peft"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def test_design_module_table_matches_the_files_one_to_one():
    text = (REPO / "docs" / "design.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(dpt_peft/[\w/]+\.py)` \|", table, flags=re.M))
    files = {str(p.relative_to(REPO)) for p in _modules()}
    assert listed == files, f"missing from docs/design.md: {sorted(files - listed)}; stale: {sorted(listed - files)}"


def test_readme_config_table_lists_every_config_field():
    from dpt_peft import DPTConfig

    text = (REPO / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert listed == {"class_names", *DPTConfig.user_field_names()}


def test_cli_flags_come_from_the_config_fields():
    from dpt_peft import DPTConfig
    from dpt_peft.cli import build_parser

    flags = {action.dest for action in build_parser()._actions}
    assert set(DPTConfig.user_field_names()) <= flags
    assert not {"vision_hidden_size", "peft_type", "class_names"} & flags


def test_no_reference_to_files_outside_the_repository():
    tracked = [*_modules(), REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "tests").glob("*.py")]
    offenders = [str(p) for p in tracked if "METHOD" + ".md" in p.read_text() or "../" + "shared" in p.read_text()]
    assert not offenders


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imported_modules(path: Path) -> set[str]:
    """Package modules `path` imports anywhere: at module level, inside functions and under TYPE_CHECKING."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    names = {_module_name(p) for p in _modules()}
    return {name for name in found if name in names} - {module}


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imported_modules(p) for p in _modules()}


def test_no_import_cycles():
    graph = _import_graph()

    def visit(name: str, path: tuple[str, ...]) -> None:
        for target in graph.get(name, ()):
            assert target not in path, f"import cycle: {' -> '.join((*path, target))}"
            if target != "dpt_peft":  # importing a subpackage runs the package's __init__ first, by design
                visit(target, (*path, target))

    for name in graph:
        visit(name, (name,))


# The layers of docs/design.md, lowest first: a module imports its own layer and the layers below, never above,
# and never a peer layer of the same rank (experiments and integrations know nothing of each other).
LAYERS = {
    "utils": 0,
    "toy": 0,
    "metrics": 0,
    "backbones": 1,
    "data": 1,
    "core": 2,
    "training": 3,
    "experiments": 4,
    "integrations": 4,
    "cli": 5,
}
ENTRY_POINTS = {"dpt_peft", "dpt_peft.__main__"}  # registration and `python -m`: they may import any layer


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "dpt_peft.cli":
        return "cli"
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def test_imports_follow_the_layers():
    offenders = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in _import_graph().items()
        if module not in ENTRY_POINTS
        for target in targets
        if target not in ENTRY_POINTS
        and _layer(target) != _layer(module)
        and LAYERS[_layer(target)] >= LAYERS[_layer(module)]
    ]
    assert not offenders, "\n".join(offenders)


# The cap stands for one concept per module. The tuner is one class, from injection to `classify` (its label spaces
# and class features are components in their own modules), so it may be longer than one file of the cap.
# The config is one dataclass: its fields' documentation and the validation that names each field.
LINE_CAP_EXCEPTIONS = {"dpt_peft/model.py": 475, "dpt_peft/config.py": 420}


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _modules()}
    long = {name: n for name, n in lengths.items() if n > LINE_CAP_EXCEPTIONS.get(name, 400)}
    assert not long, long


def test_changelog_names_the_current_version_first():
    import dpt_peft

    first = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), flags=re.M).group(1)
    assert first == dpt_peft.__version__


def test_modules_reach_no_private_attribute_of_other_objects():
    """Layers, the tuner and the tools talk through public seams (peft_types.py patches enums, documented there)."""
    pattern = re.compile(r"(?<![\w.])(?!self\b|cls\b)[A-Za-z_][\w\]\)]*\.(_[a-z]\w*)")
    offenders = [
        f"{p.relative_to(REPO)}: {m.group(0)}"
        for p in _modules()
        if p.name != "peft_types.py"
        for m in pattern.finditer(p.read_text())
        if m.group(1) != "_version"  # torch's in-place version counter of a tensor
    ]
    assert not offenders


@pytest.mark.slow
def test_python_dash_m_lists_the_commands():
    completed = subprocess.run(
        [sys.executable, "-m", "dpt_peft", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    for command in ("train", "evaluate", "predict", "visualize", "ablation", "benchmark"):
        assert f"  {command} " in completed.stdout


TEST_FOLDERS = {"core", "backbones", "data", "toy", "training", "integrations", "experiments", "cli", "utils"}


def test_tests_sit_in_the_folder_of_the_layer_they_test_and_are_named_by_concept():
    """A test of `dpt_peft/data/` is in tests/data/, of the core in tests/core/; names say what is tested, not when."""
    files = [p.relative_to(REPO / "tests") for p in (REPO / "tests").rglob("test_*.py")]
    misplaced = [str(f) for f in files if len(f.parts) != 2 or f.parts[0] not in TEST_FOLDERS]
    assert misplaced == ["test_repository.py"]
    assert not [f for f in files if re.search(r"round\d|issue\d|habits_\d", f.name)]
