"""The package's shape: no import cycles, each group importing only the groups below it, and
the module paths that stored runs name still importing."""

import ast
import importlib
import pkgutil
import tarfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import gptlab
from conftest import rewrite_paths, store_uri

SRC = Path(gptlab.__file__).parent
# the groups from the top down; a group imports only those below it (the package's own
# `__init__`, `errors` and `console` are the ground every group stands on)
LAYERS = ["cli", "sweeps", "run", "tracking", "models", "data"]
# modules at an old path, kept because stored runs, checkpoints and logged models name them
OLD_PATHS = {"gptlab.logged_model": "gptlab.tracking.logged_model",
             "gptlab.callbacks": "gptlab.run.callbacks",
             "gptlab.progress": "gptlab.run.progress"}


def modules() -> list[str]:
    return ["gptlab", *(m.name for m in pkgutil.walk_packages([str(SRC)], "gptlab."))]


def source_of(module: str) -> Path:
    path = SRC.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str, known: set[str]) -> set[str]:
    """The gptlab modules `module` imports anywhere in its text (inside functions too: an
    import deferred for start-up time still ties the modules together)."""
    tree = ast.parse(source_of(module).read_text())
    package = module if source_of(module).name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gptlab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            if not base.startswith("gptlab"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` runs pkg/__init__ as Python always does for a
                # parent; the dependency is on the submodule
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {m: imports(m, known) for m in known}


def test_no_module_imports_itself_back():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join([*path[path.index(n):], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_group_imports_only_the_groups_below_it():
    upward = [f"{m} -> {n}" for m, deps in graph().items() for n in deps
              if m not in OLD_PATHS and layer(m) is not None and layer(n) is not None
              and layer(n) < layer(m)]
    assert upward == []


def test_the_ground_imports_no_group():
    ground = [m for m in modules() if layer(m) is None and m not in OLD_PATHS]
    assert {"gptlab", "gptlab.errors", "gptlab.console"} <= set(ground)
    g = graph()
    assert {m: sorted(g[m] - set(ground)) for m in ground if g[m] - set(ground)} == {}


@pytest.mark.parametrize("module", modules())
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("old,new", sorted(OLD_PATHS.items()))
def test_old_paths_name_the_same_objects(old, new):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    public = [n for n in dir(new_module) if not n.startswith("_")
              and getattr(getattr(new_module, n), "__module__", None) == new]
    assert public and all(getattr(old_module, n) is getattr(new_module, n) for n in public)


def test_the_data_module_keeps_its_old_name():
    from hydra.utils import get_class

    from gptlab.data.datamodule import CorpusDataModule

    assert get_class("gptlab.data.CharDataModule") is CorpusDataModule
    assert get_class("gptlab.data.CorpusDataModule") is CorpusDataModule


# ---- a store made before the modules moved ----------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "before_move.tar.gz"
MADE_IN = "/tmp/pm"  # where the fixture's run was made; its corpus was MADE_IN/small.txt
RUN = "7bf6832ae61a4b4e896e7a09e72359af"


@pytest.fixture
def before_move(tmp_path, small_corpus) -> Path:
    """The store of a tiny run (20 steps, its checkpoint, config.yaml and logged model) made
    by gptlab before its modules moved into groups (fixtures/before_move.tar.gz), unpacked
    where `in_process` looks, with the absolute paths of the machine that made it replaced by
    this test's, as a store copied to another machine would need."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    places = [(f"{MADE_IN}/small.txt", str(small_corpus)), (MADE_IN, str(tmp_path))]
    rewrite_paths(tmp_path / "mlruns" / "mlflow.db", places)
    for path in (tmp_path / "mlruns" / "artifacts").rglob("*"):
        if path.is_file() and path.suffix != ".ckpt":
            text = path.read_text(encoding="utf-8")
            for old, new in places:
                text = text.replace(old, new)
            path.write_text(text, encoding="utf-8")
    config = next((tmp_path / "mlruns").rglob("config.yaml")).read_text()
    assert "_target_: gptlab.data.CharDataModule" in config
    assert "_target_: gptlab.progress.StepBar" in config
    assert "_target_: gptlab.callbacks.SampleText" in config
    return tmp_path


def test_a_run_made_before_the_move_resumes(before_move, in_process, capsys):
    from gptlab.cli import train as train_cli

    code, _, err = in_process(train_cli.main, [f"resume={RUN}", "trainer.max_steps=30"], capsys)
    assert code == 0, err[-2000:]
    run = MlflowClient(store_uri(before_move)).get_run(RUN)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gptlab.resume.1"].startswith("from step 20")
    assert [m.step for m in MlflowClient(store_uri(before_move)).get_metric_history(
        RUN, "val/loss")] == [10, 20, 30]


def test_a_checkpoint_made_before_the_move_samples(before_move, in_process, capsys):
    from gptlab.cli import sample as sample_cli

    code, out, err = in_process(sample_cli.main, [f"run_id={RUN}", "max_new_tokens=40",
                                                  "logger.experiment_name=before_move"], capsys)
    assert code == 0, err[-2000:]
    assert "step 20" in err and len(out.strip()) >= 20


def test_a_model_logged_before_the_move_loads_and_samples(before_move, in_process, capsys):
    from gptlab.cli import sample as sample_cli

    generator = (before_move / "mlruns").rglob("generator.py").__next__().read_text()
    assert "from gptlab.logged_model import TextGenerator" in generator
    code, out, err = in_process(sample_cli.main, [f"model=runs:/{RUN}/model",
                                                  "max_new_tokens=40"], capsys)
    assert code == 0, err[-2000:]
    assert "step 20" in err and len(out.strip()) >= 20
