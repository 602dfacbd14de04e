"""Eight sessions at once through the same cached models get exactly what they would get alone."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from core import threads
from core.explain import METHODS, compute_cam
from core.imaging import read_scan
from core.models import Runner, forward_module, load_model, resolve_layer
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
        for replica in classifier.runner._free:  # every replica back in the pool, the primary among them
            assert all(not _hooks(m) for m in replica.modules())
            assert all(p.grad is None for p in replica.parameters())


def _hooks(module: torch.nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)


def test_a_replica_made_while_the_others_are_busy_carries_none_of_their_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy replica carries its computation's hooks (the head's feature catcher, Grad-CAM's). A copy made from it
    kept them for good: each later forward pass appended its features, and a heatmap's whole autograd graph behind
    them, to a list nobody read (the Streamlit server grew by about 25 MB per heatmap under concurrent sessions)."""
    threads.configure("serve")  # torch's settings as any server has them, before the policy is widened below
    two = dataclasses.replace(threads.policy(), concurrency=max(2, threads.policy().concurrency))
    monkeypatch.setattr(threads, "policy", lambda: two)  # two computations at once, whatever this machine's cores
    classifier = load_model(get_task("brain_mri"))
    runner = Runner(classifier.module, classifier.spec.backbone.head, max_replicas=2)
    size = classifier.spec.input_size
    batch = torch.zeros(1, 3, size, size)
    caught: list[int] = []
    with runner.replica() as busy:
        handle = resolve_layer(busy, runner.head).register_forward_pre_hook(lambda *_: caught.append(1))
        with runner.replica() as fresh:  # every replica busy: a copy is made now
            assert fresh is not busy
            assert all(not _hooks(m) for m in fresh.modules())
            # weights of its own: a backward pass on it must not write the busy replica's gradients
            assert not {id(p) for p in fresh.parameters()} & {id(p) for p in busy.parameters()}
            forward_module(fresh, batch, runner.head)
        handle.remove()
    assert caught == []
    np.testing.assert_allclose(forward_module(fresh, batch).logits, forward_module(busy, batch).logits, atol=1e-6)
