"""Eight sessions at once through the same cached models get exactly what they would get alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from core.explain import METHODS, compute_cam
from core.imaging import read_scan
from core.models import load_model
from core.decision import predict
from core.preprocess import EvalPreset
from core.tasks import get_task
from tests.conftest import encode, synthetic_slice


def test_parallel_predictions_and_heatmaps_match_sequential_ones() -> None:
    classifiers = {key: load_model(get_task(key)) for key in ("brain_mri", "ct_cancer")}
    jobs = []
    for i in range(8):
        key = ("brain_mri", "ct_cancer")[i % 2]
        scan = read_scan(encode(synthetic_slice(160 + 8 * i, seed=20 + i, kind=i)), f"s{i}.png")
        tensor = EvalPreset(classifiers[key].spec)(scan).tensor
        jobs.append((classifiers[key], tensor, i % classifiers[key].spec.num_classes, METHODS[i % len(METHODS)]))

    def run(job):
        classifier, tensor, target, method = job
        with torch.inference_mode():  # as a Streamlit script thread may be
            probabilities = predict(classifier, tensor)[0].probabilities
        return probabilities, compute_cam(classifier, tensor, target, method)

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            together = list(pool.map(run, jobs))
            for (p_alone, cam_alone), (p_together, cam_together) in zip(alone, together):
                np.testing.assert_allclose(p_together, p_alone, rtol=0, atol=1e-6)
                # computations running side by side get one thread each (core.threads), alone two: the sums run
                # in another order, so the maps agree to float precision, not bit for bit; a mixed-up map differs by far more
                np.testing.assert_allclose(cam_together, cam_alone, rtol=0, atol=1e-3)
    for classifier in classifiers.values():
        assert all(not m._forward_hooks and not m._backward_hooks for m in classifier.module.modules())
