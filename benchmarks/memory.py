"""Where the resident memory goes: one process holding every bundled model, or the app's own server.

    python -m benchmarks.memory             # in this process: import stages, models loaded, each used once
    python -m benchmarks.memory --server    # the app's Streamlit server: idle, then after one result per page

The first form runs in its own process (`python -m benchmarks` starts it) so that nothing else
inflates the peak. It prints one JSON object: models, peak_rss_mb (the kernel's VmHWM, the
high-water mark of this process's resident set), the resident set after each stage (torch; the
torchvision models, which import torch._dynamo through torchvision.ops; pytorch-grad-cam, which
imports scikit-learn and matplotlib; the app's UI libraries; models loaded; each used once), and
`mappings_mb`, the resident set split by what it maps (see `mapping_groups`). VmHWM rather than
ru_maxrss, which Linux carries over from the parent across fork and exec.

The second starts `streamlit run app.py` (`benchmarks.server`), opens the home page (which loads
every model, `ui.cache.warm_up`), then on each task page uploads one synthetic scan and waits for
the prediction, the heatmap and its faithfulness line, as a browser tab would. It prints the
server's resident set when idle with the models loaded, 2 s after the last result, its peak, and
the same split by mapping.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.proc import mapping_groups, rss_mb, status_mb  # noqa: F401 - also read from here


def in_process() -> dict:
    """Import, load and use every bundled model here; the resident set after each stage."""
    stages = {"python": rss_mb()}
    import torch

    stages["torch imported"] = rss_mb()
    import torchvision.models  # noqa: F401 - the backbone library; torchvision.ops imports torch._dynamo

    stages["torchvision imported"] = rss_mb()
    import pytorch_grad_cam  # noqa: F401 - what the first heatmap imports (scikit-learn and matplotlib with it)

    stages["pytorch-grad-cam imported"] = rss_mb()
    import pandas  # noqa: F401 - the UI's libraries, as the server holds them
    import plotly.graph_objects  # noqa: F401
    import streamlit  # noqa: F401

    stages["streamlit, plotly, pandas imported"] = rss_mb()
    from benchmarks.samples import encode, synthetic_slice
    from core.pipeline import analyse
    from core.models import WEIGHTS_DIR, load_model
    from core.tasks import TASKS

    data = encode(synthetic_slice(512, seed=1))
    loaded = [load_model(spec) for key, spec in TASKS.items() if (WEIGHTS_DIR / f"{key}.safetensors").is_file()]
    stages["models loaded"] = rss_mb()
    for classifier in loaded:
        analysis = analyse(classifier, data, "scan.png")
        analysis.faithfulness(analysis.prediction.label)  # the heatmap and its ROAD score, as the page shows them
    stages["each used once (predict, Grad-CAM, ROAD)"] = rss_mb()
    return {"models": [c.spec.key for c in loaded], "peak_rss_mb": round(status_mb("VmHWM"), 1),
            "stages_mb": {k: round(v, 1) for k, v in stages.items()}, "mappings_mb": mapping_groups(),
            "threads": torch.get_num_threads()}


def server(timeout: float, settle: float = 2.0) -> dict:
    """The app's server: idle with every model loaded, then after one result (heatmap included) per task page."""
    import asyncio

    from benchmarks.load import one_result
    from benchmarks.samples import encode, synthetic_slice
    from benchmarks.server import serve
    from benchmarks.session import AppSession
    from core.tasks import PAGES
    from ui.navigation import url_path

    async def use(url: str, pid: int) -> dict:
        async with AppSession(url, timeout) as session:
            await session.run("")  # the home page: every model loaded (ui.cache.warm_up)
        idle = {"rss_mb": round(status_mb("VmRSS", pid), 1), "mappings_mb": mapping_groups(pid)}
        for index, page in enumerate(PAGES):
            async with AppSession(url, timeout) as session:
                opened = await session.run(url_path(page))
                await one_result(session, url_path(page), opened.uploader_ids[0], f"scan{index}.png",
                                 encode(synthetic_slice(512, seed=index)))
        await asyncio.sleep(settle)  # the server hands freed memory back once idle for a second (core.threads)
        return {"idle": idle, "after": {"rss_mb": round(status_mb("VmRSS", pid), 1), "mappings_mb": mapping_groups(pid)},
                "peak_mb": round(status_mb("VmHWM", pid), 1), "pages": list(PAGES)}

    with serve(timeout=timeout) as running:
        return asyncio.run(use(running.url, running.process.pid))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Where the resident memory goes (see the module docstring).")
    parser.add_argument("--server", action="store_true", help="measure the app's Streamlit server instead")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server and each page")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    print(json.dumps(server(args.timeout) if args.server else in_process()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
