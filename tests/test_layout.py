"""The package's shape, computed from the sources: wings without import circles, a core that never
imports the course, and a public API that only grows.

Every import counts, at module level or inside a function (a function-level import is still a
dependency, only a later one); those under `if TYPE_CHECKING:` are type hints and do not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kdlab

PACKAGE = Path(kdlab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The kdlab modules `path` imports (a `from pkg import name` names the submodule when there is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kdlab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "kdlab":
                subs = {f"{target}.{a.name}" for a in node.names} & modules
                found.update(subs or {target})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(me)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if not colour.get(nxt):
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if not colour.get(node):
            found = dfs(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_of_every_form(tmp_path):
    """The checker itself, on a made-up package: relative, absolute, function-level, TYPE_CHECKING."""
    src = tmp_path / "kdlab"
    (src / "w").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "w" / "__init__.py").write_text("")
    (src / "a.py").write_text(
        "from .w import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
    )
    (src / "w" / "b.py").write_text("def f():\n    from ..c import x\n")
    (src / "c.py").write_text("import kdlab.a\n")
    modules = {"kdlab", "kdlab.w", "kdlab.a", "kdlab.w.b", "kdlab.c"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, src
    try:
        graph = {module_name(f): imports_of(f, modules) for f in sorted(src.rglob("*.py"))}
    finally:
        PACKAGE = saved
    assert graph["kdlab.a"] == {"kdlab.w.b"}  # the TYPE_CHECKING import of c does not count
    assert graph["kdlab.w.b"] == {"kdlab.c"}
    assert graph["kdlab.c"] == {"kdlab.a"}
    assert find_cycle(graph) == ["kdlab.a", "kdlab.w.b", "kdlab.c", "kdlab.a"]


def test_no_import_circle_inside_kdlab():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_core_never_imports_the_course():
    core = {m: deps for m, deps in import_graph().items() if not m.startswith("kdlab.course")}
    offenders = {m: sorted(d for d in deps if d.startswith("kdlab.course")) for m, deps in core.items()}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_trainer_never_imports_the_builder():
    graph = import_graph()
    wing = {m: deps for m, deps in graph.items() if m.startswith("kdlab.training")}
    assert not {m for m, deps in wing.items() if "kdlab.build" in deps}


# kdlab.__all__ as it stood before the wings (issue 26): names may be added, never removed
PUBLIC_BEFORE_WINGS = """
KDConfig load_config save_config KDLabError CurriculumScheduler Ramp EarlyStopping kd_loss kd_loss_topk
teacher_top_k lm_loss sampled_reverse_kl next_token_labels IGNORE_INDEX DIVERGENCES TeacherCache cache_key
build_teacher_cache open_teacher_cache ln_mse cosine_distance attention_kl info_nce masked_mean_pool
Objective Loss StepCounts Term TermContext Needs TERMS register_term unregister_term BatchSource
PackedBatches GeneratedBatches OnPolicyObjective Callback ProgressBar BestWeights StudentAwareRouter
AdaptiveBalancer align_vocab StudentLogitProjector Precision resolve_precision teacher_logits
student_logits PackedSplit prepare_austen prepare_data load_documents tokenize_and_pack STUDENT_PRESETS
prepare_teacher load_teacher load_tokenizer build_student evaluate format_summary save_checkpoint
load_checkpoint latest_checkpoint Trainer TrainState train
""".split()


def test_public_api_only_grows():
    assert not set(PUBLIC_BEFORE_WINGS) - set(kdlab.__all__)
    missing = [name for name in kdlab.__all__ if not hasattr(kdlab, name)]
    assert not missing
    assert callable(kdlab.train)  # the function that runs a config; the training wing is kdlab.training
    import kdlab.training.trainer as trainer_module

    assert trainer_module.Trainer is kdlab.Trainer


def test_only_the_engine_knows_how_a_step_is_distributed():
    """scripts/change_cost.py: the files whose code talks to torch.distributed, DDP or FSDP directly
    (switching DDP for FSDP2 touched 8 before the engine): the engine, and the fused loss's unwrapping
    of a wrapper (model.module) to find the output head."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "change_cost.py"
    spec = importlib.util.spec_from_file_location("change_cost", script)
    change_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(change_cost)
    code = change_cost.code_only('"""dist.barrier() in a docstring"""\nx = 1  # all_reduce_sum(t, info) in a comment\n')
    assert "barrier" not in code and "all_reduce" not in code and "x = 1" in code
    touched = change_cost.touched(change_cost.sources(None))["switch DDP to FSDP2"]
    assert touched == ["kdlab/loss/fused.py", "kdlab/training/engine.py"]
