"""Model cards: the JSON file beside every weights file, as typed, versioned sections.

A card says what the model is (labels, arch, input, preprocessing, normalisation), how it was made
(data, split, command, config, commit, library versions), how it scored on held-out data, and how
to use it (temperature, operating threshold, indeterminate band, guard, intended use, limitations).

Each section is a dataclass with one writer (the MONAI bundle's `metadata.json` in spirit):

| section | type | written by |
|---|---|---|
| identity, `temperature`, `threshold`, `metrics`, `validation`, `split`, `data`, `training`, `findings` | `Metrics`, `SplitAudit`, `DataSource`, `Training`, `FindingCard` | `core.train` |
| `appraisal` (intervals, ROC and reliability curves) | `Appraisal` | `core.lab.appraisal` |
| `indeterminate` (the bands, chosen on validation) | `Indeterminate` | `core.lab.appraisal` |
| `explanations` (CAM faithfulness, randomisation check) | `Explanations` | `core.lab.appraisal` |
| `guard` | `GuardCard` | `core.lab.guard_fit` |
| `shortcuts` | `ShortcutAudit` | `core.lab.shortcuts` |
| `acquisition` | `FramingAudit` | `core.lab.framing` |
| `study` (the study-level call) | dict | the study calibration |

`card_version` is the schema; `read_card` migrates older cards and `changelog` records what each
writer changed and when. Unknown fields are refused.
"""

from __future__ import annotations

import datetime
import functools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from core.tasks import TaskSpec

CARD_VERSION = 2
S = TypeVar("S", bound="Section")


def _coerce(kind: Any, value: Any) -> Any:
    """A JSON value as the annotated type: dataclass sections built, containers walked, None kept."""
    if value is None or kind is Any:
        return value
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(kind) if arg is not type(None)]
        return _coerce(options[0], value) if len(options) == 1 else value
    if isinstance(kind, type) and is_dataclass(kind):
        return kind.from_dict(value) if isinstance(value, dict) else value
    if origin is dict:
        _, item = get_args(kind)
        return {key: _coerce(item, v) for key, v in value.items()}
    if origin is list:
        (item,) = get_args(kind)
        return [_coerce(item, v) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class Section:
    """A card section: built from its JSON object, strictly (unknown keys are refused)."""

    @classmethod
    def from_dict(cls: type[S], raw: dict | S) -> S:
        """The section from a JSON object (or the section itself).

        Raises:
            ValueError: On unknown or missing keys, naming them.
        """
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(raw).__name__}")
        hints = get_type_hints(cls, globalns=vars(typing) | globals())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has unknown fields: {', '.join(unknown)}")
        try:
            return cls(**{name: _coerce(hints[name], value) for name, value in raw.items()})
        except TypeError as exc:
            raise ValueError(f"{cls.__name__} is incomplete: {exc}") from None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------- figures


@dataclass
class ClassFigures(Section):
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Confusion(Section):
    labels: list[str]
    matrix: list[list[int]]


@dataclass
class Operating(Section):
    """Sensitivity and specificity of the thresholded class (or group) at the operating threshold."""

    sensitivity: float | None
    specificity: float | None
    threshold: float | None = None


@dataclass
class Grouped(Section):
    """A positive group (e.g. pneumonia = bacterial + viral) against the rest."""

    positive: str
    accuracy: float | None
    roc_auc: float | None


@dataclass
class Metrics(Section):
    """Scores of the calibrated model on one side of the split."""

    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    roc_auc: float | None
    ece: float | None
    per_class: dict[str, ClassFigures]
    confusion_matrix: Confusion
    split: str = "test"
    at_threshold: Operating | None = None
    positive_vs_rest: Grouped | None = None
    ece_before_temperature: float | None = None


@dataclass
class Interval(Section):
    estimate: float | None
    low: float | None
    high: float | None


@dataclass
class Intervals(Section):
    """95% bootstrap intervals, resampling whole split groups (near-duplicates merged with patients)."""

    resamples: int
    unit: str
    groups: int
    metrics: dict[str, Interval]


@dataclass
class RocCurve(Section):
    fpr: list[float]
    tpr: list[float]
    threshold: list[float]
    auc: float | None


@dataclass
class Reliability(Section):
    edges: list[float]
    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]


@dataclass
class Appraisal(Section):
    """Intervals and curves of the test side (`core.lab.appraisal`)."""

    intervals: Intervals
    roc: dict[str, RocCurve]
    reliability: Reliability
    findings: dict[str, Intervals] = field(default_factory=dict)


@dataclass
class BandFigures(Section):
    n: int
    share_uncertain: float | None
    accuracy_outside: float | None
    accuracy_inside: float | None


@dataclass
class BandCard(Section):
    """One output's indeterminate band in log-odds, chosen on validation (width 0: no band)."""

    scale: str
    width: float
    rule: str
    chosen_on: str
    selection: str
    validation: BandFigures
    test: BandFigures
    widths_tried: list[float] = field(default_factory=list)
    max_share: float | None = None
    alpha: float | None = None
    p_value: float | None = None


@dataclass
class Indeterminate(Section):
    """The bands of the class call and of each finding (`core.lab.appraisal`)."""

    classes: BandCard
    findings: dict[str, BandCard] = field(default_factory=dict)


@dataclass
class FindingFigures(Section):
    n: int
    positives: int
    roc_auc: float | None
    average_precision: float | None
    threshold: float
    sensitivity: float | None
    specificity: float | None


@dataclass
class FindingCard(Section):
    """One independent finding: its calibration, threshold and figures (`core.train`)."""

    title: str
    temperature: float
    threshold: float
    threshold_rule: str
    validation: FindingFigures
    test: FindingFigures


@dataclass
class SplitAudit(Section):
    """How the split was carved and what lies on each side (`core.train`)."""

    method: str
    images: int
    near_duplicate_groups: int
    split_groups: int
    near_duplicate_groups_mixing_labels: int
    near_duplicate_groups_across_splits: int
    counts: dict[str, dict[str, int]]
    patients: int | None = None
    patients_across_splits: int | None = None
    patients_per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    findings: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class DataSource(Section):
    folder: str
    source: str
    licence: str
    trained_on: str


@dataclass
class Training(Section):
    """How the weights were made (`core.train`): the command, its full configuration and the record."""

    command: str
    config: dict[str, Any]
    device: str
    epochs_run: int
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    git_commit: str
    versions: dict[str, str]
    world_size: int = 1
    hardware: dict[str, Any] | None = None
    recipe: str | None = None
    images_per_s: dict[str, Any] = field(default_factory=dict)
    batchnorm_recalibrated: int | None = None  # BatchNorm layers recalibrated before fine-tuning
    sessions: int = 1
    training_seconds: float | None = None
    calibration: dict[str, str] | None = None


@dataclass
class GuardCard(Section):
    """The wrong-input guard: its file, thresholds and measured rates (`core.lab.guard_fit`)."""

    file: str
    sha256: str
    method: str
    threshold: float
    measured: dict[str, Any]
    measured_on: str
    command: str
    borderline: float | None = None


@dataclass
class MethodFaithfulness(Section):
    mean: float
    sd: float
    share_positive: float
    cam_ms_median: float | None = None


@dataclass
class Faithfulness(Section):
    metric: str
    images: int
    methods: dict[str, MethodFaithfulness]


@dataclass
class SanityCheck(Section):
    stages: list[str]
    methods: dict[str, list[float]]
    images: int
    measure: str


@dataclass
class Explanations(Section):
    """How faithful each CAM method is, the default it gives, and the randomisation check (`core.lab.appraisal`)."""

    faithfulness: Faithfulness
    default_method: str
    default_rule: str
    sanity_check: SanityCheck
    fails_randomisation: list[str] = field(default_factory=list)
    cam_layers: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShortcutAudit(Section):
    """Scores with the lung fields blanked / kept alone, CAM mass in the lungs (`core.lab.shortcuts`)."""

    lung_fields: str
    lung_area_share: float
    scores: dict[str, dict[str, Any]]
    cam: dict[str, Any]
    command: str = ""
    preprocessing: list[str] = field(default_factory=list)


@dataclass
class FramingAudit(Section):
    """Do image size, aspect or border give the label away; scores on re-framed images (`core.lab.framing`)."""

    frame_features: dict[str, Any]
    reframed: dict[str, Any]
    method: str
    command: str = ""


@dataclass
class Change(Section):
    """One entry of a card's changelog."""

    date: str
    change: str
    card_version: int = CARD_VERSION


# ---------------------------------------------------------------- the card


@dataclass
class ModelCard(Section):
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
    metrics: Metrics | None = None
    validation: Metrics | None = None
    split: SplitAudit | None = None
    data: DataSource | None = None
    training: Training | None = None
    sha256: str = ""
    weights_format: str = ""
    intended_use: str = ""
    appraisal: Appraisal | None = None
    guard: GuardCard | None = None
    indeterminate: Indeterminate | None = None
    explanations: Explanations | None = None
    shortcuts: ShortcutAudit | None = None
    acquisition: FramingAudit | None = None
    findings: dict[str, FindingCard] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)
    changelog: list[Change] = field(default_factory=list)
    card_version: int = CARD_VERSION

    def __setattr__(self, name: str, value: Any) -> None:
        # A section given as a JSON object (a writer's dict, at construction or later) becomes its type.
        if isinstance(value, (dict, list)):
            value = _coerce(_card_hints()[name], value)
        super().__setattr__(name, value)

    def log(self, change: str, when: datetime.date | None = None) -> None:
        """Add a changelog entry (what a writer changed), dated today unless given."""
        self.changelog.append(Change((when or datetime.date.today()).isoformat(), change))

    @property
    def test_figures(self) -> Metrics:
        """The held-out test figures (raises if the card has none)."""
        if self.metrics is None:
            raise ValueError(f"card {self.key} has no test figures")
        return self.metrics


@functools.lru_cache(maxsize=1)
def _card_hints() -> dict[str, Any]:
    return get_type_hints(ModelCard, globalns=vars(typing) | globals())


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
        if not finding.temperature > 0 or not 0.0 < finding.threshold < 1.0:
            problems.append(f"finding {name} needs a positive temperature and a threshold in (0, 1)")
    if not card.temperature > 0:
        problems.append(f"temperature must be positive, got {card.temperature}")
    if card.threshold is not None and not 0.0 < card.threshold < 1.0:
        problems.append(f"threshold must lie in (0, 1), got {card.threshold}")
    return problems


def migrate(raw: dict) -> dict:
    """A card's JSON object brought to the current schema (`CARD_VERSION`); unchanged if it is current.

    Version 1 -> 2: the appraisal's intervals and curves leave `metrics` for `appraisal` (and each
    finding's test intervals go there too); the indeterminate bands become `indeterminate.classes` and
    `indeterminate.findings` (a fixed-margin band of version 1 is dropped: the app never used it
    again); empty sections (`{}`) become absent; a changelog starts.
    """
    version = int(raw.get("card_version", 1))
    if version >= CARD_VERSION:
        return raw
    raw = json.loads(json.dumps(raw))  # a deep copy
    metrics = raw.get("metrics") or {}
    intervals, curves = metrics.pop("intervals", None), metrics.pop("curves", None)
    finding_intervals, finding_bands = {}, {}
    for name, finding in (raw.get("findings") or {}).items():
        found = (finding.get("test") or {}).pop("intervals", None)
        if found is not None:
            finding_intervals[name] = found
        band = finding.pop("indeterminate", None)
        if band is not None:
            finding_bands[name] = band

    def nested(flat: dict) -> dict:
        return {"resamples": flat["resamples"], "unit": flat["unit"], "groups": flat["groups"],
                "metrics": {k: v for k, v in flat.items() if k not in ("resamples", "unit", "groups")}}

    if intervals is not None and curves is not None:
        raw["appraisal"] = {"intervals": nested(intervals), "roc": curves["roc"], "reliability": curves["reliability"],
                            "findings": {name: nested(found) for name, found in finding_intervals.items()}}
    band = raw.get("indeterminate") or {}
    raw["indeterminate"] = ({"classes": band, "findings": finding_bands} if band.get("scale") == "log-odds" else None)
    for name in ("guard", "explanations", "shortcuts", "acquisition", "metrics", "validation", "split", "data",
                 "training"):
        if raw.get(name) == {}:
            raw[name] = None
    raw["changelog"] = [*raw.get("changelog", []),
                        {"date": datetime.date.today().isoformat(), "card_version": CARD_VERSION,
                         "change": f"card schema {version} -> {CARD_VERSION}: sections typed; intervals and curves "
                                   "moved to `appraisal`, bands to `indeterminate.classes` / `.findings`"}]
    raw["card_version"] = CARD_VERSION
    return raw


def read_card(path: Path) -> ModelCard:
    """Read a card file, migrating an older schema in memory.

    Raises:
        ValueError: If the file is not a valid card (bad JSON, missing or unknown fields).
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model card {Path(path).name}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model card {Path(path).name} is not a JSON object")
    try:
        return ModelCard.from_dict(migrate(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"model card {Path(path).name} is not valid: {exc}") from None


def write_card(card: ModelCard, path: Path) -> None:
    """Write a card as indented JSON (stable key order, for readable diffs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")


def update_card(path: Path, change: str, **sections: Any) -> None:
    """Replace whole sections of the card at `path` (e.g. `acquisition=...`), log the change and write it back.

    Raises:
        ValueError: If the card cannot be read or a name is not a card field.
    """
    card = read_card(path)
    for name, value in sections.items():
        if name not in _card_hints():
            raise ValueError(f"{name!r} is not a model card field")
        setattr(card, name, value)
    card.log(change)
    write_card(card, path)
