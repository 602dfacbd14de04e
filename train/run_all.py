"""Train every model with its whole-backbone recipe, one run after another, resumably.

Usage (from the repository root; a long job, so in the background at the lowest priority):

    OMP_WAIT_POLICY=PASSIVE nohup nice -n 19 python train/run_all.py --data-root ../shared/data \
        > runs/driver.out 2>&1 &
    python train/run_all.py --estimate            # the queue with estimated times, nothing run
    python train/run_all.py --only head_ct-mobilenet_v2 --dry-run

The queue (`QUEUE`): every model on MobileNetV2 first (head_ct, ct_covid, ct_cancer, brain_mri,
cxr_pneumonia, cxr_covid), then every model on EfficientNet-Lite0, then the comparisons that
decide whether mixup / cutmix earn their keep. Run NAME writes to runs/NAME/: `train.log`, the
checkpoint after every epoch (`<key>.checkpoint.pt`), and at the end `<key>.safetensors` and
`<key>.json` (its card). The driver skips a run whose card exists and resumes one whose
checkpoint exists, so after an interruption (a reboot, a killed process) the same command
carries on where it stopped. A run that fails is logged in runs/driver.log and the queue goes on.

Each run is `python -m core.train --task KEY --data ROOT/KEY --out runs/NAME --resume` plus the
run's options: the model's recipe (core/recipes.py) does the rest.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.lab.recipes import get_recipe, resolve_pretrained  # noqa: E402
from core.tasks import get_task  # noqa: E402

ORDER = ("head_ct", "ct_covid", "ct_cancer", "brain_mri", "cxr_pneumonia", "cxr_covid")


@dataclass(frozen=True)
class Run:
    """One training run: a model, a backbone, and options beyond the recipe."""

    task: str
    arch: str = "mobilenet_v2"
    variant: str = ""
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.task}-{self.arch}" + (f"-{self.variant}" if self.variant else "")


MIX = ("--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "0.5")
QUEUE: tuple[Run, ...] = (
    *(Run(task) for task in ORDER),
    *(Run(task, "efficientnet_lite0") for task in ORDER),
    # does mixing images earn its keep? the same recipe with mixup / cutmix on half the batches
    *(Run(task, "mobilenet_v2", "mix", MIX) for task in ("ct_covid", "ct_cancer", "head_ct", "brain_mri")),
)


def command(run: Run, data_root: Path, runs_dir: Path) -> list[str]:
    return [sys.executable, "-m", "core.train", "--task", run.task, "--data", str(data_root / run.task),
            "--arch", run.arch, "--out", str(runs_dir / run.name), "--resume", *run.options]


def lower_autogroup(niceness: int) -> str:
    """Give this process's scheduler autogroup the process's own niceness, and say what it is.

    With Linux's autogroup scheduling (on by default), `nice` only ranks processes within one
    session's group; a job started with `nohup`/`setsid` is its own group and competes with an
    interactive shell as an equal, so `nice -n 19` alone does not make it a background job
    (beside a training run started so, a benchmark's predict p50 was 1,116 ms; 10 ms once its group was at 19).
    Writing the niceness to /proc/self/autogroup makes the whole group yield.
    """
    path = Path("/proc/self/autogroup")
    if niceness > 0 and path.exists():
        try:
            path.write_text(str(niceness))
        except OSError:
            pass
    try:
        return path.read_text().strip()
    except OSError:
        return "no autogroup"


def train_images(data_root: Path, task: str) -> int:
    """About how many images the train side holds: the manifest's rows less the recipe's val and test shares."""
    recipe = get_recipe(task)
    manifest = data_root / task / "manifest.csv"
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    return int(rows * (1.0 - recipe.val_frac - recipe.test_frac))


def estimate(run: Run, data_root: Path, rates: dict[int, float], head_factor: float = 4.0) -> float:
    """Seconds of training for a run at the given whole-backbone images/s per input side (head epochs cheaper)."""
    recipe = get_recipe(run.task)
    images = train_images(data_root, run.task)
    side = get_task(run.task).input_size
    low = recipe.low_res or side
    epochs = [low] * recipe.head_epochs + [low] * (recipe.epochs - recipe.full_res_epochs) + [side] * recipe.full_res_epochs
    seconds = 0.0
    for index, s in enumerate(epochs):
        rate = rates.get(s) or rates[min(rates, key=lambda r: abs(r - s))] * (min(rates, key=lambda r: abs(r - s)) / s) ** 2
        seconds += images / rate / (head_factor if index < recipe.head_epochs else 1.0)
    slowdown = 1.15 if run.arch == "efficientnet_lite0" else 1.0  # measured: Lite0 steps ~10-20% slower
    return seconds * slowdown


def log(path: Path, message: str) -> None:
    line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {message}"
    print(line, flush=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--only", nargs="+", default=None, help="run names (TASK-ARCH[-VARIANT]) to do, in queue order")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and what each run would do")
    parser.add_argument("--estimate", action="store_true", help="print each run's estimated training time and stop")
    parser.add_argument("--rates", nargs="+", default=["160:60", "192:45", "224:35"],
                        help="whole-backbone images/s per side for --estimate (SIDE:RATE; defaults measured on the "
                             "2 shared cores, see train/README.md)")
    args = parser.parse_args()
    if Path.cwd().resolve() != REPO:
        parser.error(f"run from the repository root ({REPO.name}/): the runs' paths are relative to it")
    queue = [run for run in QUEUE if args.only is None or run.name in args.only]
    if args.only and len(queue) != len(args.only):
        known = ", ".join(run.name for run in QUEUE)
        parser.error(f"unknown run in {args.only}; known: {known}")
    if args.estimate:
        rates = {int(k): float(v) for k, v in (item.split(":") for item in args.rates)}
        total = 0.0
        for run in queue:
            seconds = estimate(run, args.data_root, rates)
            total += seconds
            print(f"{run.name:40s} {train_images(args.data_root, run.task):5d} train images  ~{seconds / 3600:.1f} h")
        print(f"{'total':40s} ~{total / 3600:.1f} h (training only; validation, reading and scoring add about 10%)")
        return 0
    missing = sorted({path for run in queue for path in [resolve_pretrained(get_recipe(run.task).pretrained, run.arch)]
                      if path not in (None, "package", "hub") and not Path(path).is_file()})
    if missing:
        parser.error(f"ImageNet weights not found: {', '.join(missing)} (set SECONDLOOK_PRETRAINED to their folder)")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    driver_log = args.runs_dir / "driver.log"
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if not args.dry_run:
        group = lower_autogroup(os.nice(0))
        log(driver_log, f"driver started (pid {os.getpid()}, nice {os.nice(0)}, {group}): {len(queue)} runs")
    for run in queue:
        out = args.runs_dir / run.name
        key = run.task
        cmd = command(run, args.data_root, args.runs_dir)
        if (out / f"{key}.json").is_file():
            if not args.dry_run:
                log(driver_log, f"{run.name}: finished before, skipped")
            continue
        state = "resume" if (out / f"{key}.checkpoint.pt").is_file() else "start"
        if args.dry_run:
            print(f"{run.name} ({state}): {' '.join(cmd[1:])}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        log(driver_log, f"{run.name}: {state}: {' '.join(cmd[1:])}")
        started = time.time()
        with open(out / "train.log", "a", encoding="utf-8") as handle:
            handle.write(f"\n=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {state}: {' '.join(cmd[1:])}\n")
            handle.flush()
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        minutes = (time.time() - started) / 60
        log(driver_log, f"{run.name}: {'done' if code == 0 else f'FAILED (exit {code})'} after {minutes:.0f} min")
    if not args.dry_run:
        log(driver_log, "driver finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
