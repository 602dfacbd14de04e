"""Model cards: the JSON file beside every weights file.

A card says what the model is (labels, arch, input, preprocessing, normalisation), how it was made
(data, split, command, config, commit, library versions), how it scored on held-out data,
and how to use it (temperature, operating threshold, intended use, limitations).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.tasks import TaskSpec

CARD_VERSION = 1


@dataclass
class ModelCard:
    """Everything a reader or the app needs to know about one weights file."""

    key: str
    name: str
    version: str
    labels: list[str]
    arch: str
    input_size: int
    mean: list[float]
    std: list[float]
    cam_layer: str
    preprocessing: list[str] = field(default_factory=list)  # core.preprocess steps, in order
    temperature: float = 1.0
    positive: str | None = None
    threshold: float | None = None
    threshold_rule: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    weights_format: str = ""
    intended_use: str = ""
    guard: dict[str, Any] = field(default_factory=dict)
    indeterminate: dict[str, Any] = field(default_factory=dict)
    explanations: dict[str, Any] = field(default_factory=dict)
    shortcuts: dict[str, Any] = field(default_factory=dict)
    acquisition: dict[str, Any] = field(default_factory=dict)  # core.lab.framing: size / aspect / border shortcuts
    # multi-label models: per finding, in registry order: title, temperature, threshold, threshold_rule,
    # validation and test figures (core.lab.train)
    findings: dict[str, Any] = field(default_factory=dict)
    # the study call (core.lab.study): aggregation of the slice outputs, study threshold, figures on patients;
    # read only through core.study.study_rule
    study: dict[str, Any] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)
    card_version: int = CARD_VERSION


def card_from_spec(spec: TaskSpec, **values: Any) -> ModelCard:
    """A card whose identity fields are copied from the registry entry."""
    return ModelCard(
        key=spec.key,
        labels=list(spec.labels),
        arch=spec.arch,
        input_size=spec.input_size,
        mean=list(spec.mean),
        std=list(spec.std),
        cam_layer=spec.cam_layer,
        preprocessing=list(spec.preprocessing),
        positive=spec.positive,
        **values,
    )


def check_card(card: ModelCard, spec: TaskSpec) -> list[str]:
    """Differences between a card and its registry entry; empty when they agree."""
    problems = []
    expected = {
        "key": spec.key,
        "labels": list(spec.labels),
        "arch": spec.arch,
        "input_size": spec.input_size,
        "cam_layer": spec.cam_layer,
        "positive": spec.positive,
        "preprocessing": list(spec.preprocessing),
    }
    for name, value in expected.items():
        if getattr(card, name) != value:
            problems.append(f"{name} is {getattr(card, name)!r}, registry says {value!r}")
    for name in ("mean", "std"):
        got, want = getattr(card, name), list(getattr(spec, name))
        if len(got) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
            problems.append(f"{name} is {got}, registry says {want}")
    if list(card.findings) != list(spec.findings):
        problems.append(f"findings are {list(card.findings)}, registry says {list(spec.findings)}")
    for name, finding in card.findings.items():
        if not finding.get("temperature", 0) > 0 or not 0.0 < finding.get("threshold", -1) < 1.0:
            problems.append(f"finding {name} needs a positive temperature and a threshold in (0, 1)")
    if not card.temperature > 0:
        problems.append(f"temperature must be positive, got {card.temperature}")
    if card.threshold is not None and not 0.0 < card.threshold < 1.0:
        problems.append(f"threshold must lie in (0, 1), got {card.threshold}")
    return problems


def read_card(path: Path) -> ModelCard:
    """Read a card file.

    Raises:
        ValueError: If the file is not a valid card (bad JSON, missing or unknown fields).
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model card {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model card {path} is not a JSON object")
    known = {f.name for f in fields(ModelCard)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"model card {path} has unknown fields: {', '.join(unknown)}")
    try:
        return ModelCard(**raw)
    except TypeError as exc:
        raise ValueError(f"model card {path} is incomplete: {exc}") from None


def write_card(card: ModelCard, path: Path) -> None:
    """Write a card as indented JSON (stable key order, for readable diffs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(card), indent=2) + "\n", encoding="utf-8")


def update_card(path: Path, **sections: Any) -> None:
    """Replace whole fields of the card at `path` (e.g. `acquisition=...`) and write it back.

    Raises:
        ValueError: If the card cannot be read or a field is not a card field.
    """
    card = read_card(path)
    known = {f.name for f in fields(ModelCard)}
    for name, value in sections.items():
        if name not in known:
            raise ValueError(f"{name!r} is not a model card field")
        setattr(card, name, value)
    write_card(card, path)
