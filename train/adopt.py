"""Bundle a finished training run: copy its weights and card into weights/, then rerun every measurement the card carries.

Usage (from the repository root):

    python train/adopt.py runs/head_ct-mobilenet_v2 --data-root ../shared/data
    python train/adopt.py runs/head_ct-mobilenet_v2 --data-root ../shared/data --dry-run   # the steps only

A run's card holds what training measured (split, recipe, calibration, test figures). The rest of
a bundled card is measured on the bundled file and would be stale for new weights, so after the
copy this runs, in order, each step's log going to `train/<key>.<step>.log`:

1. `core.lab.guard_fit --task KEY`: the wrong-input guard (`weights/guard/KEY.safetensors`, card
   section `guard`); the app refuses to load a model without it.
2. `core.lab.appraisal --task KEY`: bootstrap intervals, the indeterminate band, the CAM layers,
   faithfulness per method and the randomisation check.
3. `core.lab.shortcuts --write-card` (chest X-ray models), `core.lab.framing --write-card` (brain MRI).
4. `core.lab.study --write-card` (CT and MRI models): the study call on validation patients.

The run's training log is kept as `train/runs/<run>.log` (every run is recorded, bundled or not)
and the bundled one also as `train/<key>.log`. The registry entry must already name the run's
backbone (`core/tasks.py`): a card that disagrees with it is refused here, as at load.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cards import check_card, read_card  # noqa: E402
from core.tasks import get_task  # noqa: E402

MAX_WEIGHTS_BYTES = 10 * 2**20
SHORTCUTS = ("cxr_covid", "cxr_pneumonia")
FRAMING = ("brain_mri",)
STUDY_OPTIONS = {
    "head_ct": (),
    "ct_covid": (),
    "ct_cancer": (),
    "brain_mri": ("--absent", "no_tumor", "--positive-name", "tumour"),
}


def steps(key: str, data: Path) -> list[tuple[str, list[str]]]:
    """The measurement commands for one bundled model, in the order they must run."""
    out = [("guard", ["-m", "core.lab.guard_fit", "--data-root", str(data.parent), "--task", key]),
           ("appraisal", ["-m", "core.lab.appraisal", "--task", key, "--data", str(data)])]
    if key in SHORTCUTS:
        out.append(("shortcuts", ["-m", "core.lab.shortcuts", "--task", key, "--data", str(data), "--write-card"]))
    if key in FRAMING:
        out.append(("framing", ["-m", "core.lab.framing", "--task", key, "--data", str(data), "--write-card"]))
    if key in STUDY_OPTIONS:
        out.append(("study", ["-m", "core.lab.study", "--task", key, "--data", str(data), "--write-card",
                              *STUDY_OPTIONS[key]]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (runs/<task>-<arch>[-variant])")
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding every task's data folder")
    parser.add_argument("--from-step", default=None, help="skip the copy and the steps before this one (after a failure)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    args = parser.parse_args(argv)

    key = args.run.name.split("-")[0]
    try:
        spec = get_task(key)
    except ValueError as exc:  # the run folder is named after its task: <task>-<arch>[-variant]
        parser.error(f"{args.run.name}: {exc}")
    weights, card_path = args.run / f"{key}.safetensors", args.run / f"{key}.json"
    if not weights.is_file() or not card_path.is_file():
        parser.error(f"{args.run} has no finished {key}.safetensors and {key}.json")
    problems = check_card(read_card(card_path), spec)
    if problems:
        parser.error(f"the run's card disagrees with the registry entry of {key}: {'; '.join(problems)}")
    if weights.stat().st_size > MAX_WEIGHTS_BYTES:
        parser.error(f"{weights} is {weights.stat().st_size / 2**20:.1f} MB, over the 10 MB a bundled model may weigh")
    data = args.data_root / key
    todo = steps(key, data)
    names = [name for name, _ in todo]
    if args.from_step and args.from_step not in names:
        parser.error(f"--from-step must be one of {', '.join(names)}")
    if args.dry_run:
        print(f"copy {weights} and {card_path} -> weights/")
        for name, command in todo:
            print(f"{name}: python {' '.join(command)}  > train/{key}.{name}.log")
        return 0
    if args.from_step is None:
        shutil.copyfile(weights, ROOT / "weights" / weights.name)
        shutil.copyfile(card_path, ROOT / "weights" / card_path.name)
        (ROOT / "train" / "runs").mkdir(exist_ok=True)
        shutil.copyfile(args.run / "train.log", ROOT / "train" / "runs" / f"{args.run.name}.log")
        shutil.copyfile(args.run / "train.log", ROOT / "train" / f"{key}.log")
        print(f"copied {args.run.name} into weights/", flush=True)
    started = args.from_step is None
    for name, command in todo:
        started = started or name == args.from_step
        if not started:
            continue
        log = ROOT / "train" / f"{key}.{name}.log"
        print(f"{name}: python {' '.join(command)}", flush=True)
        with log.open("w") as handle:
            result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        if result.returncode:
            print(f"{name} failed (exit {result.returncode}); see {log}; rerun with --from-step {name}", file=sys.stderr)
            return result.returncode
    print(f"{key}: bundled and measured", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
