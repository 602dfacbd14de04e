"""Peak resident memory of one process holding every bundled model, after using each once.

    python -m benchmarks.memory

Run in its own process (by `python -m benchmarks`) so that nothing else inflates the peak.
Prints one JSON object: models, peak_rss_mb (the kernel's VmHWM, the high-water mark of this
process's resident set), and the resident set after each stage (imports, models loaded, used).
VmHWM rather than ru_maxrss, which Linux carries over from the parent across fork and exec.
"""

from __future__ import annotations

import json
import sys


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM) in MB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_mb() -> float:
    """Current resident set size in MB."""
    return status_mb("VmRSS")


def main() -> int:
    stages = {"python": rss_mb()}
    import torch

    stages["torch imported"] = rss_mb()
    import pytorch_grad_cam  # noqa: F401 - what the first heatmap imports, counted on its own
    import torchvision  # noqa: F401

    stages["torchvision, pytorch-grad-cam imported"] = rss_mb()
    from benchmarks.samples import encode, synthetic_slice
    from core.explain import compute_cam
    from core.imaging import read_scan
    from core.models import WEIGHTS_DIR, load_model
    from core.decision import predict
    from core.preprocess import EvalPreset
    from core.tasks import TASKS

    data = encode(synthetic_slice(512, seed=1))
    loaded = []
    for key, spec in TASKS.items():
        if not (WEIGHTS_DIR / f"{key}.safetensors").is_file():
            continue
        loaded.append(load_model(spec))
    stages["models loaded"] = rss_mb()
    for classifier in loaded:
        spec = classifier.spec
        scan = read_scan(data, "scan.png")
        tensor = EvalPreset(spec)(scan).tensor
        prediction = predict(classifier, tensor)[0]
        compute_cam(classifier, tensor, prediction.index)
    stages["each used once (predict + Grad-CAM)"] = rss_mb()
    print(json.dumps({"models": [c.spec.key for c in loaded], "peak_rss_mb": round(status_mb("VmHWM"), 1),
                      "stages_mb": {k: round(v, 1) for k, v in stages.items()}, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
