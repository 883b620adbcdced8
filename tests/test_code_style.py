"""The surface a reader meets, checked: line length, one alias per imported module, imports at
the top, and the layering of the package (no module imports one above its layer)."""
import ast
import importlib.util
import pathlib
from collections import defaultdict

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("ddt_jax/**/*.py"), *REPO.glob("input_pipeline/*.py"),
                  *REPO.glob("configs/*.py"), *REPO.glob("benchmarks/*.py"),
                  *REPO.glob("tests/*.py"), REPO / "train.py", REPO / "sample.py",
                  REPO / "evaluate.py"])
MAX_COLUMNS = 100
# Imported inside functions on purpose: they pull in TensorFlow (clu, tfds) or are optional.
LAZY_ALLOWED = ("torch", "tqdm", "clu", "tensorflow", "tensorflow_datasets")

# The layers of the library, bottom first: a module imports only from lower layers, or from its
# own layer inside its own package (models.ddt uses models.layers). README "Layout" shows them.
LAYERS = (
    ("ddt_jax.files", "ddt_jax.host_memory"),
    ("ddt_jax.models", "ddt_jax.rng", "ddt_jax.console", "ddt_jax.flops", "ddt_jax.sharding",
     "ddt_jax.tpu_topology",
     "ddt_jax.checkpoint", "ddt_jax.sampler", "ddt_jax.evaluation.frechet",
     "ddt_jax.evaluation.adm",
     "ddt_jax.evaluation.images", "ddt_jax.convert.state_dict", "ddt_jax.convert.fill",
     "input_pipeline"),
    ("ddt_jax.convert", "ddt_jax.flow", "ddt_jax.evaluation.mnist_classifier",
     "ddt_jax.evaluation.mnist_eval", "ddt_jax.evaluation.inception_features"),
    ("ddt_jax.weights", "ddt_jax.config_schema", "ddt_jax.evaluation.grids",
     "ddt_jax.evaluation.fid_monitor"),
    ("ddt_jax.convert.cli", "ddt_jax.sample_dump", "ddt_jax.trainer",
     "input_pipeline.prepare_imagenet"),
    ("ddt_jax.convert.__main__", "ddt_jax.evaluation.reference",
     "ddt_jax.evaluation.evaluate_npz"),
)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def imports(tree):
    """(module, alias, node) for every import of a module (not of a name from a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, a.asname or a.name, node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if is_module(full):
                    yield full, a.asname or a.name, node


def layer_of(name: str):
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (
                    best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    return best


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_lines_fit_in_100_columns(path):
    long = [i + 1 for i, line in enumerate(path.read_text().splitlines())
            if len(line) > MAX_COLUMNS]
    assert not long, f"{path.relative_to(REPO)}: lines over {MAX_COLUMNS} columns: {long}"


def test_each_module_has_one_import_alias():
    aliases = defaultdict(set)
    for path in SOURCES:
        for module, alias, _ in imports(ast.parse(path.read_text())):
            aliases[module].add((alias, str(path.relative_to(REPO))))
    clashes = {m: sorted(v) for m, v in aliases.items() if len({a for a, _ in v}) > 1}
    assert not clashes, clashes


def test_imports_are_at_the_top_except_heavy_or_optional_ones():
    lazy = []
    for path in SOURCES:
        if path.parent.name == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        names = ([sub.module] if isinstance(sub, ast.ImportFrom)
                                 else [a.name for a in sub.names])
                        if not all(n.split(".")[0] in LAZY_ALLOWED for n in names):
                            lazy.append(f"{path.relative_to(REPO)}:{sub.lineno} {names}")
    assert not lazy, lazy


def test_no_module_imports_above_its_layer():
    library = [p for p in SOURCES if module_name(p).split(".")[0] in ("ddt_jax", "input_pipeline")]
    wrong, unplaced = [], []
    for path in library:
        name = module_name(path)
        here = layer_of(name)
        if here is None:
            if name not in ("ddt_jax", "ddt_jax.evaluation", "ddt_jax.models"):
                unplaced.append(name)
            continue
        for module, _, _ in imports(ast.parse(path.read_text())):
            if module.split(".")[0] not in ("ddt_jax", "input_pipeline", "configs"):
                continue
            there = layer_of(module)
            if there is None:
                wrong.append(f"{name} imports {module}, which is no library layer")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]
                                        and not module.startswith(name.rsplit(".", 1)[0])):
                wrong.append(f"{name} (layer {here[0]}) imports {module} (layer {there[0]})")
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
    assert not wrong, wrong
