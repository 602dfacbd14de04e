"""The acquisition shortcut check: frame features alone, and the model on re-framed images."""

from __future__ import annotations

import numpy as np
import pytest

from core.lab.data import read_records
from core.lab.framing import REFRAMINGS, acquisition_check, check, frame_features, reframe
from core.models import load_model
from core.tasks import get_task
from tests.conftest import encode, synthetic_slice


def test_reframing_reaches_the_asked_aspect_and_keeps_the_content() -> None:
    image = (np.arange(100 * 80) % 251).astype(np.uint8).reshape(100, 80)
    for how in REFRAMINGS:
        out = reframe(image, how)
        want = 4 / 3 if how.endswith("4:3") else 3 / 4
        assert out.shape[1] / out.shape[0] == pytest.approx(want, abs=0.02), how
        if how.startswith("pad"):
            assert out.shape[0] >= 100 and out.shape[1] >= 80 and int(out.sum()) == int(image.sum())  # black padding only
        else:
            assert out.shape[0] <= 100 and out.shape[1] <= 80
    with pytest.raises(ValueError, match="unknown re-framing"):
        reframe(image, "pad_16:9")


def test_frame_features_see_black_borders() -> None:
    image = np.full((100, 100), 150, np.uint8)
    assert frame_features(image)["border_dark"] == 0.0
    padded = reframe(image, "pad_4:3")
    features = frame_features(padded)
    assert features["border_dark"] > 0.2 and features["content_aspect"] == pytest.approx(1.0)
    assert features["aspect"] == pytest.approx(4 / 3, abs=0.02)


def _sized(label_index: int, seed: int) -> np.ndarray:
    """A scan whose stored size gives its class away (the trap the check is for)."""
    shape = [(120, 120), (120, 160), (160, 120), (100, 100)][label_index]
    return synthetic_slice(200, seed=seed)[: shape[0], : shape[1]]


def test_size_that_gives_the_label_away_is_caught(tmp_path) -> None:
    spec = get_task("brain_mri")
    train, test = [], []
    for k, label in enumerate(spec.labels):
        train += [(_sized(k, 10 * k + i), label) for i in range(8)]
        test += [(_sized(k, 500 + 10 * k + i), label) for i in range(4)]
    result = acquisition_check([a for a, _ in train], [b for _, b in train], [a for a, _ in test], [b for _, b in test],
                               spec.labels)
    assert result["size"]["accuracy"] == 1.0 and result["majority_class_accuracy"] == 0.25

    for i, (image, label) in enumerate(train + test):  # the whole command path on a folder
        (tmp_path / label).mkdir(exist_ok=True)
        (tmp_path / label / f"{i}.png").write_bytes(encode(image))
    section = check(load_model(spec), read_records(tmp_path))
    assert set(section["reframed"]) == {"as_is", *REFRAMINGS}
    n = section["reframed"]["as_is"]["n"]
    assert n > 0 and all(s["n"] == n for s in section["reframed"].values())
    assert section["frame_features"]["size"]["accuracy"] >= 0.9


def test_update_card_replaces_one_field_and_refuses_unknown_ones(tmp_path) -> None:
    import shutil

    from core.cards import read_card, update_card
    from core.models import WEIGHTS_DIR

    path = tmp_path / "brain_mri.json"
    shutil.copy(WEIGHTS_DIR / "brain_mri.json", path)
    before = read_card(path)
    update_card(path, "acquisition: test", acquisition={"frame_features": {}, "reframed": {}, "method": "test"})
    after = read_card(path)
    assert after.acquisition.to_dict() == {"frame_features": {}, "reframed": {}, "method": "test", "command": ""}
    assert after.metrics == before.metrics and after.changelog[-1].change == "acquisition: test"
    with pytest.raises(ValueError, match="not a model card field"):
        update_card(path, "nonsense", nonsense=1)
