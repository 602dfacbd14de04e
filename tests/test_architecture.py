"""The shape of the code: one pipeline, the runtime apart from the lab, no import cycle, a complete registry,
typed and versioned cards, integrity that a card cannot switch off."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.tasks import BACKBONES, PAGES, TASKS
from tests.conftest import REPO, encode, synthetic_slice

PACKAGES = ("core", "ui", "api", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (at any depth of the file), resolved to known module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES if (REPO / package).is_dir() for p in (REPO / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def test_no_import_cycle_in_the_projects_packages() -> None:
    graph = import_graph()
    assert "core.pipeline" in graph and "core.lab.train" in graph
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing nothing of its children is not an edge back
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_runtime_never_imports_the_lab() -> None:
    graph = import_graph()
    runtime = [m for m in graph if m.startswith(("core.", "ui.")) and not m.startswith("core.lab")
               and m not in ("core.train", "core.evaluate")]  # the two command shims of the lab
    offenders = {m: sorted(d for d in graph[m] if d.startswith("core.lab")) for m in runtime}
    assert not {m: d for m, d in offenders.items() if d}


def test_importing_the_app_pages_loads_no_training_evaluation_or_audit_module() -> None:
    code = ("import sys; import ui.task_page, ui.cards_page, ui.batch_page, ui.home_page, ui.navigation, core.pipeline;"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('core.lab', 'sklearn.linear_model')))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ""


def test_the_pages_come_from_the_registry() -> None:
    from ui.navigation import task_pages, url_path

    assert PAGES == tuple(dict.fromkeys(spec.page for spec in TASKS.values()))
    assert list(task_pages()) == list(PAGES)
    assert url_path("Chest X-ray") == "chest-x-ray"


def test_the_registrys_steps_run_once_per_upload() -> None:
    """cxr_covid crops its border: the analysis, its heatmap, its faithfulness and its stability check share one
    prepared input, so the step runs exactly once for the whole page."""
    from core.models import load_model
    from core.pipeline import analyse
    from core.preprocess import STEP_RUNS

    classifier = load_model(TASKS["cxr_covid"])
    before = STEP_RUNS["border_crop"]
    analysis = analyse(classifier, encode(synthetic_slice(300, seed=8)), "chest.png")
    analysis.heatmap("covid19", "Grad-CAM")
    analysis.heatmap("normal", "EigenCAM")
    analysis.faithfulness("covid19", "Grad-CAM")
    analysis.stability()
    assert STEP_RUNS["border_crop"] - before == 1
    assert analysis.input.cropped and analysis.heatmap("covid19", "Grad-CAM").placed.shape == analysis.scan.shape


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_builds_and_resolves_its_cam_layer_head_and_blocks(arch: str) -> None:
    """Like timm's test_model_default_cfgs: the table's facts hold for the model the builder makes."""
    import dataclasses

    import torch

    from core.models import backbone_blocks, build_model, head_module, resolve_layer

    backbone = BACKBONES[arch]
    spec = dataclasses.replace(TASKS["ct_covid"], arch=arch, cam_layer="", mean=backbone.mean, std=backbone.std)
    assert spec.cam_layer == backbone.cam_layer
    model = build_model(spec).eval()
    layer = resolve_layer(model, spec.cam_layer)
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    handle.remove()
    assert out.shape == (1, spec.num_outputs)
    assert seen and seen[0][-1] == seen[0][-2] == spec.cam_grid, (arch, seen)
    head = head_module(model, arch)
    assert any(p.shape[0] == spec.num_outputs for p in head.parameters())
    blocks = backbone_blocks(model, arch)
    assert len(blocks) >= 3 and head not in blocks
    head_ids = {id(p) for p in head.parameters()}
    assert not any(id(p) in head_ids for block in blocks for p in block.parameters())


# ---------------------------------------------------------------- cards


def test_cards_are_typed_versioned_and_old_cards_migrate(tmp_path: Path) -> None:
    from core.cards import CARD_VERSION, Appraisal, Metrics, ModelCard, migrate, read_card, update_card, write_card
    from core.models import WEIGHTS_DIR

    card = read_card(WEIGHTS_DIR / "head_ct.json")
    assert card.card_version == CARD_VERSION and isinstance(card.metrics, Metrics)
    assert isinstance(card.appraisal, Appraisal) and card.appraisal.intervals.metrics["accuracy"].low is not None
    assert card.findings["sdh"].test.positives >= 0 and card.indeterminate.classes.scale == "log-odds"
    # a version-1 card (intervals inside metrics, a fixed band, empty sections) migrates on reading
    old = card.to_dict()
    old.pop("appraisal")
    old.pop("changelog")
    old["card_version"] = 1
    old["metrics"]["intervals"] = {"resamples": 10, "unit": "u", "groups": 3,
                                   "accuracy": {"estimate": 0.8, "low": 0.7, "high": 0.9}}
    old["metrics"]["curves"] = {"roc": {}, "reliability": {"edges": [0, 1], "confidence": [0.5], "accuracy": [0.5],
                                                            "count": [1]}}
    old["indeterminate"] = {"margin": 0.1, "rule": "old", "test": {}}
    old["shortcuts"] = {}
    path = tmp_path / "head_ct.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    migrated = read_card(path)
    assert migrated.card_version == CARD_VERSION and migrated.indeterminate is None and migrated.shortcuts is None
    assert migrated.appraisal.intervals.metrics["accuracy"].estimate == 0.8
    assert "schema 1 -> 2" in migrated.changelog[-1].change
    assert migrate(card.to_dict()) == card.to_dict()  # a current card is left alone
    # one writer per section, logged; unknown fields refused
    write_card(migrated, path)
    update_card(path, "acquisition: a test", acquisition={"frame_features": {}, "reframed": {}, "method": "m"})
    assert read_card(path).changelog[-1].change == "acquisition: a test"
    broken = json.loads(path.read_text())
    broken["metrics"]["surprise"] = 1
    path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown fields: surprise"):
        read_card(path)
    assert ModelCard.from_dict(card.to_dict()).to_dict() == card.to_dict()


@pytest.mark.parametrize("edit,message", [
    (lambda card: card.update(sha256=""), "does not carry the sha256"),
    (lambda card: card.update(sha256="0" * 64), "does not match its card"),
    (lambda card: card.update(guard=None), "no wrong-input guard"),
    (lambda card: card["guard"].update(sha256="0" * 64), "guard file .* sha256 does not match"),
    (lambda card: card["guard"].update(file="../../head_ct.safetensors"), "must lie beside its weights"),
])
def test_integrity_cannot_be_switched_off_from_the_card(tmp_path: Path, edit, message: str) -> None:
    from core.models import WEIGHTS_DIR, WeightsError, load_model

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, folder)
    card = json.loads((folder / "head_ct.json").read_text())
    edit(card)
    (folder / "head_ct.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(WeightsError, match=message):
        load_model(TASKS["head_ct"], folder / "head_ct.safetensors")
