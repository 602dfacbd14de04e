"""`python -m core.predict`: predict files with a bundled model, one JSON line per file.

Usage:
    python -m core.predict --task brain_mri scan1.png scan2.dcm
    python -m core.predict --task head_ct --study patient.zip series_folder/ volume.nii.gz enhanced.dcm
    python -m core.predict --task head_ct --dicomweb http://localhost:8042/dicom-web --study-uid 1.2.3 [--store]

For single images it prints one JSON object per file and line (`core.pipeline.result_row`): file,
status (ok / rejected / error), reason, prediction, call, probabilities, uncertain, guard, and for a
multi-label model findings, present and unreliable.

With --study, each PATH (a ZIP of DICOM files, a folder, a multi-frame DICOM or a NIfTI file) is
read as a study and every series found gives one JSON object on one line (`core.study.study_row`),
the series the model reads by default first: file (the PATH as given), series (SeriesInstanceUID or
a name), status, reason, slices (slices used), left_out ({count, reasons}), prediction (study-level
class), probabilities (study level, every class), findings (multi-label models), slice_probabilities
(one dict per used slice, anatomical order) and key_slices (indices into that list).

With --dicomweb URL --study-uid UID [UID ...], each study is searched in that DICOMweb archive
(QIDO-RS), the series the model is for are pulled into memory (WADO-RS, nothing written to disk)
and each gives the same row as --study, `file` being the archive's study URL
(`core.pacs.archive_rows`). Credentials come from the environment (SECONDLOOK_DICOMWEB_USER and
SECONDLOOK_DICOMWEB_PASSWORD, or SECONDLOOK_DICOMWEB_TOKEN; REQUESTS_CA_BUNDLE for a private CA).
With --store, each analysed series' structured report, key slice captures and PDF report go back
into the study (STOW-RS), PACS-ready (the study's patient and study identifiers), and the row's
`store` field says what the archive holds: status (stored / partial / failed / skipped), reason,
study, sr, captures and pdf (SOP Instance UIDs) and missing. An unreachable archive, refused
credentials, a study with no series the model is for or a transfer that stops half-way give a row
with the reason.

It never stops on a bad file or study; the exit code is 0 unless the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.dicomweb import ENV_PREFIX, Archive, archive_settings
from core.models import Classifier, WeightsError, load_model
from core.pacs import archive_rows
from core.pipeline import BATCH_SIZE, Refusal, predict_uploads, result_row
from core.series import StudyError
from core.study import analyse_series, read_study_path, series_order, study_row, upload_digest
from core.tasks import TASKS, get_task

logger = logging.getLogger(__name__)


def _read_files(paths: Iterable[Path]) -> Iterator[tuple[str, bytes | OSError]]:
    for path in paths:
        try:
            yield str(path), path.read_bytes()
        except OSError as exc:
            yield str(path), exc


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict scans with a bundled SecondLook model.")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="registry key of the model")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/<task>.safetensors)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="scans per forward pass")
    parser.add_argument("--study", nargs="+", type=Path, default=None, metavar="PATH",
                        help="studies: ZIPs of DICOM files, folders, multi-frame DICOM or NIfTI files (one row per series)")
    parser.add_argument("--dicomweb", default=None, metavar="URL",
                        help="a DICOMweb archive's root (e.g. http://localhost:8042/dicom-web): analyse --study-uid there")
    parser.add_argument("--study-uid", nargs="+", default=None, metavar="UID", help="Study Instance UIDs in --dicomweb")
    parser.add_argument("--store", action="store_true",
                        help="with --dicomweb: store each series' SR, overlay captures and PDF back into its study")
    parser.add_argument("files", nargs="*", type=Path, help="PNG/JPEG/WebP/TIFF/BMP or DICOM files")
    return parser


def study_lines(classifier: Classifier, paths: list[Path], batch_size: int) -> Iterator[dict]:
    """One row per series of each study PATH, in order; a PATH that cannot be read gives one row saying why."""
    for path in paths:
        name = str(path)
        try:
            study = read_study_path(path, classifier.spec)
        except StudyError as exc:
            yield study_row(name, Refusal("rejected", str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad study must never stop the rest; the type is logged
            logger.error("study failed for %s: %s", classifier.spec.key, type(exc).__name__)
            yield study_row(name, Refusal("error", f"internal error: {type(exc).__name__}"))
            continue
        digest = upload_digest([(name, name.encode())])
        for index in series_order(study, classifier.spec):
            outcome = analyse_series(classifier, study, index, digest=digest, batch_size=batch_size)
            yield study_row(name, outcome, study.series[index], study)
        del study


def archive_of(parser: argparse.ArgumentParser, url: str) -> Archive:
    """The --dicomweb archive, with the credentials and limits of the environment (`core.dicomweb`)."""
    try:
        settings = archive_settings({**os.environ, f"{ENV_PREFIX}URL": url})
    except ValueError as exc:
        parser.error(str(exc))
    if settings is None:
        parser.error("--dicomweb needs a URL")
    return Archive(settings)


def archive_lines(classifier: Classifier, archive: Archive, study_uids: list[str], store: bool,
                  batch_size: int) -> Iterator[dict]:
    """One row per series the model is for, of each archived study (`core.pacs.archive_rows`)."""
    for uid in study_uids:
        yield from archive_rows(classifier, archive, uid, store=store, batch_size=batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    sources = [given for given in (args.study is not None, bool(args.files), args.dicomweb is not None) if given]
    if not sources:
        parser.error("give image files, --study PATH [PATH ...], or --dicomweb URL --study-uid UID")
    if len(sources) > 1:
        parser.error("give one of: image files, --study PATH [PATH ...], --dicomweb URL --study-uid UID")
    if (args.dicomweb is None) != (args.study_uid is None):
        parser.error("--dicomweb and --study-uid go together")
    if args.store and args.dicomweb is None:
        parser.error("--store needs --dicomweb URL --study-uid UID")
    for uid in args.study_uid or ():
        if len(uid) > 64 or not all(part.isdigit() for part in uid.split(".")):
            parser.error("--study-uid must be a DICOM UID (digits and dots, at most 64 characters)")
    archive = archive_of(parser, args.dicomweb) if args.dicomweb is not None else None
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    spec = get_task(args.task)
    try:
        classifier = load_model(spec, args.weights)
    except (WeightsError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    try:
        if archive is not None:
            with archive:
                for row in archive_lines(classifier, archive, args.study_uid, args.store, args.batch_size):
                    print(json.dumps(row), flush=True)
        elif args.study is not None:
            for row in study_lines(classifier, args.study, args.batch_size):
                print(json.dumps(row), flush=True)
        else:
            for name, outcome in predict_uploads(classifier, _read_files(args.files), args.batch_size):
                print(json.dumps(result_row(name, outcome)), flush=True)
    except Exception:  # noqa: BLE001 - say so in one line, not a traceback, then stop
        logger.exception("unexpected failure")
        parser.exit(1, "error: internal error; see the log\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
