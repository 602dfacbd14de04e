"""Temperature scaling, operating thresholds and calibration error, fitted on validation data."""

from __future__ import annotations

import numpy as np
import torch


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature.

    Args:
        logits: float (N, C).
        temperature: Positive scalar.

    Returns:
        float64 (N, C) probabilities; rows sum to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Element-wise sigmoid of logits / temperature (independent findings), float64, same shape."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def output_probabilities(logits: np.ndarray, num_classes: int, temperature: float = 1.0,
                         finding_temperatures: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a network output into class and finding probabilities.

    Args:
        logits: float (N, C + F): the exclusive classes' logits, then one per finding.
        num_classes: C.
        temperature: The classes' temperature.
        finding_temperatures: One temperature per finding (default all 1).

    Returns:
        (float64 (N, C) softmax of the class logits / T, rows sum to 1;
         float64 (N, F) sigmoid of each finding logit / its own T).
    """
    logits = np.asarray(logits)
    findings = logits[:, num_classes:]
    temps = [1.0] * findings.shape[1] if finding_temperatures is None else list(finding_temperatures)
    if len(temps) != findings.shape[1]:
        raise ValueError(f"{len(temps)} finding temperatures for {findings.shape[1]} finding outputs")
    finding_probs = np.stack([sigmoid(findings[:, j], t) for j, t in enumerate(temps)], axis=1) if temps else \
        np.zeros((len(logits), 0))
    return softmax(logits[:, :num_classes], temperature), finding_probs


def fit_binary_temperature(logits: np.ndarray, positives: np.ndarray) -> float:
    """Temperature of one sigmoid output: `fit_temperature` on the equivalent two-logit softmax [0, z]."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if len(z) == 0 or np.all(positives) or not np.any(positives):
        return 1.0
    return fit_temperature(np.stack([np.zeros_like(z), z], axis=1), np.asarray(positives, dtype=np.int64))


def fit_temperature(logits: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """Temperature that minimises the negative log-likelihood (Guo et al. 2017).

    Args:
        logits: float (N, C) validation logits.
        targets: int (N,) true class indices.

    Returns:
        The fitted temperature, clipped to [0.05, 20].
    """
    if len(logits) == 0:
        return 1.0
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins.

    Args:
        probabilities: float (N, C).
        targets: int (N,).
        bins: Number of confidence bins.

    Returns:
        ECE in [0, 1].
    """
    if len(targets) == 0:
        return float("nan")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def sensitivity_specificity(scores: np.ndarray, positives: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of `scores >= threshold` against boolean `positives`."""
    decided = np.asarray(scores) >= threshold
    positives = np.asarray(positives, dtype=bool)
    sens = float(decided[positives].mean()) if positives.any() else float("nan")
    spec = float((~decided[~positives]).mean()) if (~positives).any() else float("nan")
    return sens, spec


def choose_threshold(scores: np.ndarray, positives: np.ndarray, min_sensitivity: float | None = None) -> float:
    """Operating threshold on the positive-class probability, chosen on validation data.

    Without `min_sensitivity`, maximises Youden's J (sensitivity + specificity - 1); with it,
    the highest threshold whose sensitivity reaches that floor (screening use).

    Args:
        scores: float (N,) positive-class probabilities.
        positives: bool (N,) ground truth.
        min_sensitivity: Optional sensitivity floor in (0, 1].

    Returns:
        A threshold in (0, 1).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if not positives.any() or positives.all():
        return 0.5
    candidates = np.unique(np.concatenate([scores, [0.5]]))
    best, best_value = 0.5, -np.inf
    for threshold in candidates:
        sens, spec = sensitivity_specificity(scores, positives, threshold)
        if min_sensitivity is not None:
            value = threshold if sens >= min_sensitivity else -np.inf
        else:
            value = sens + spec - 1.0
        if value > best_value:
            best, best_value = float(threshold), value
    return float(np.clip(best, 1e-4, 1 - 1e-4))
