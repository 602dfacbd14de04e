"""The Model cards page: each bundled model's card, rendered for a person, and the feedback export."""

from __future__ import annotations

import logging

import streamlit as st

from core.cards import Intervals, ModelCard
from core.decision import finding_reliability
from core.feedback import ENV_ADMIN_TOKEN, admin_token_configured, count_feedback, export_feedback, is_admin_token
from core.models import WeightsError
from core.study import study_rule
from core.tasks import TASKS, describe_preprocessing
from ui import plain
from ui.cache import get_classifier
from ui.widgets import confusion_figure, disclaimer, reliability_figure, roc_figure

METRIC_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro-F1",
                "roc_auc": "ROC-AUC", "sensitivity": "Sensitivity at the threshold",
                "specificity": "Specificity at the threshold"}
logger = logging.getLogger(__name__)

APPRAISE_HINT = "python -m core.lab.appraisal --task {key} --data ../shared/data/{key}"


def _num(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def metrics_table(card: ModelCard) -> None:
    """Headline metrics with their 95% bootstrap intervals, and the per-class table."""
    m = card.test_figures
    st.markdown(f"**Held-out {m.split} split, n = {m.n}**")
    if card.appraisal is not None:
        intervals = card.appraisal.intervals
        rows = [{"metric": label, "estimate": _num(intervals.metrics[name].estimate),
                 "95% interval": f"{_num(intervals.metrics[name].low)} - {_num(intervals.metrics[name].high)}"}
                for name, label in METRIC_NAMES.items() if name in intervals.metrics]
        st.table(rows)
        st.caption(f"Intervals: {intervals.resamples} bootstrap resamples, percentile method; the unit resampled is "
                   f"the {intervals.unit} ({intervals.groups} groups), so correlated images move together.")
    else:
        st.table([{"metric": label, "estimate": _num(getattr(m, name, None))} for name, label in METRIC_NAMES.items()
                  if hasattr(m, name)])
        st.caption(f"No intervals in this card yet: `{APPRAISE_HINT.format(key=card.key)}` adds them.")
    if m.positive_vs_rest is not None:
        st.markdown(f"**{TASKS[card.key].positive_title} against the rest** (at the operating threshold): accuracy "
                    f"{_num(m.positive_vs_rest.accuracy)}, ROC-AUC {_num(m.positive_vs_rest.roc_auc)}.")
    st.table([{"class": label, "precision": _num(r.precision), "recall (sensitivity)": _num(r.recall),
               "F1": _num(r.f1), "images": r.support} for label, r in m.per_class.items()])


def curves(card: ModelCard) -> None:
    """ROC curve, confusion matrix and reliability diagram, side by side where they fit."""
    m = card.test_figures
    left, right = st.columns(2)
    if card.appraisal is not None:
        at = m.at_threshold
        point = (1 - at.specificity, at.sensitivity) if at is not None and at.specificity is not None else None
        left.markdown("**ROC curve** " + ("(operating threshold marked)" if point else "(one-vs-rest per class)"))
        left.plotly_chart(roc_figure(card.appraisal.roc, point), key=f"roc_{card.key}")
    right.markdown("**Confusion matrix** (held-out split, at the operating rule)")
    right.plotly_chart(confusion_figure(m.confusion_matrix), key=f"confusion_{card.key}")
    if card.appraisal is not None:
        left, right = st.columns(2)
        left.markdown(f"**Reliability diagram** (ECE {_num(m.ece)}, temperature {card.temperature:.2f})")
        left.plotly_chart(reliability_figure(card.appraisal.reliability), key=f"reliability_{card.key}")
        if card.indeterminate is not None:
            band = card.indeterminate.classes
            right.markdown("**Indeterminate band** (chosen on validation)")
            right.markdown(
                f"The app says *uncertain* instead of a class {band.rule}. On the held-out split "
                f"{_pct(band.test.share_uncertain)} of images fell inside it; accuracy inside "
                f"{_pct(band.test.accuracy_inside)}, outside {_pct(band.test.accuracy_outside)}."
                if band.width > 0 else f"No band: {band.rule}."
            )


def _pct(value: object) -> str:
    return f"{value:.1%}" if isinstance(value, float) else "n/a"


def explanations(card: ModelCard) -> None:
    """Which CAM method is most faithful, and whether the maps pass the randomisation check."""
    section = card.explanations
    if section is None:
        st.caption(f"Not measured yet: `{APPRAISE_HINT.format(key=card.key)}`.")
        return
    faith = section.faithfulness
    st.markdown(f"**Faithfulness** on {faith.images} held-out images ({faith.metric}); higher is more faithful. "
                f"The app's default method is **{section.default_method}** ({section.default_rule}).")
    st.table([{"method": method, "ROAD mean": f"{v.mean:+.3f}", "SD": f"{v.sd:.3f}",
               "images with a positive score": f"{v.share_positive:.0%}"} for method, v in faith.methods.items()])
    sanity = section.sanity_check
    st.markdown(f"**Model-randomisation sanity check** (Adebayo et al. 2018) on {sanity.images} images: "
                f"{sanity.measure}, as layers are randomised from the top. A map that stays similar after "
                "the layers are randomised shows the image, not what the model learned.")
    header = ["method"] + [f"through {name}" for name in sanity.stages] + ["reading"]
    st.table([dict(zip(header, [method] + [f"{v:.2f}" for v in values] + [randomisation_reading(values[0])]))
              for method, values in sanity.methods.items()])
    means = [round(v.mean, 6) for v in faith.methods.values()]
    if len(set(means)) < len(means):
        st.caption("Methods with the same score give the same map here: the CAM layer is average-pooled into one linear "
                   "layer, so Grad-CAM, HiResCAM and XGradCAM weigh the activations identically.")


def randomisation_reading(after_head: float) -> str:
    """What the first stage of the randomisation check says about a method."""
    if after_head < 0.8:
        return "changes once the head is randomised: it reflects what the model learned"
    return "mostly unchanged without the trained head: it shows image structure as much as the model's evidence"


def shortcut_audit(card: ModelCard) -> None:
    """What a chest X-ray model scores without its lungs, and with only its lungs (where measured)."""
    section = card.shortcuts
    if section is None:
        return
    st.subheader("Shortcut audit: does it read the lungs?")
    names = {"original": "images as they are", "lungs_blanked": "lung fields blanked out",
             "lungs_only": "only the lung fields kept"}
    st.table([{"test images": names.get(name, name), "accuracy": _num(s["accuracy"]),
               "balanced accuracy": _num(s["balanced_accuracy"]), "ROC-AUC": _num(s["roc_auc"])}
              for name, s in section.scores.items()])
    blanked = section.scores["lungs_blanked"].get("roc_auc")
    if isinstance(blanked, float) and blanked >= 0.8:
        st.warning(f"With the lung fields blanked out the model still ranks the classes with ROC-AUC {blanked:.2f}: "
                   "much of what it uses lies outside the lungs (source, device, markers, body habitus).")
    cam = section.cam
    if cam.get("mass_in_lungs_mean") is not None:
        st.markdown(f"{cam['method']} puts {cam['mass_in_lungs_mean']:.0%} of its mass (mean over {cam['images']} "
                    f"held-out images) inside the lung fields, which cover {section.lung_area_share:.0%} of the image.")
    st.caption(f"Lung fields: {section.lung_fields}. Command: `{section.command}`.")


def _interval(found: Intervals | None, name: str) -> str:
    value = found.metrics.get(name) if found is not None else None
    if value is None or value.low is None:
        return "n/a"
    return f"{_num(value.low)} - {_num(value.high)}"


def findings_table(card: ModelCard) -> None:
    """A multi-label model's independent findings: threshold and held-out figures with intervals."""
    if not card.findings:
        return
    st.subheader("Findings (independent outputs)")
    rows = []
    for name, finding in card.findings.items():
        test = finding.test
        found = card.appraisal.findings.get(name) if card.appraisal is not None else None
        rows.append({"finding": finding.title, "threshold": _num(finding.threshold),
                     "held-out positive slices": test.positives, "ROC-AUC": _num(test.roc_auc),
                     "95% interval": _interval(found, "roc_auc"), "average precision": _num(test.average_precision),
                     "sensitivity": _num(test.sensitivity), "95% interval ": _interval(found, "sensitivity"),
                     "specificity": _num(test.specificity),
                     "shown as": "unreliable: " + reason if (reason := finding_reliability(finding)) else "reliable"})
    st.table(rows)
    rule = next(iter(card.findings.values())).threshold_rule
    st.caption(f"Each finding has its own sigmoid output, temperature and threshold ({rule}); intervals resample whole "
               "patients. Where few positive slices stand behind a row, read its figures as anecdotes.")


def study_section(card: ModelCard) -> None:
    """The study-level call (a whole series): its rule and, where patients exist, its figures on test patients."""
    section = card.study
    rule = study_rule(card, TASKS[card.key])
    st.subheader("Study call (a whole series)")
    st.markdown(f"**Rule:** {rule.describe()}. " + (f"Threshold: {section.get('threshold_rule', '')}." if section else ""))
    if not section or not section.get("validated"):
        st.caption(section.get("note", "") if section else "No study calibration in this card: `python -m core.lab.study`"
                   " writes one.")
        st.caption("This study call was not validated per patient (the data have no patient IDs).")
        return
    rows = []
    for side in ("validation", "test"):
        figures = section.get(side) or {}
        row = {"patients": side, "n": figures.get("patients"), "with the finding": figures.get("positives")}
        for name in ("roc_auc", "sensitivity", "specificity"):
            value = figures.get(name) or {}
            row[name.replace("_", "-").upper() if name == "roc_auc" else name] = (
                f"{_num(value.get('estimate'))} [{_num(value.get('low'))} - {_num(value.get('high'))}]"
                + (f" ({value['count']})" if value.get("count") else ""))
        rows.append(row)
    st.table(rows)
    st.caption(f"Unit: {section.get('unit', 'patient')}. Intervals: {section.get('bootstrap', {}).get('interval', '')}. "
               f"Command: `{section.get('command', '')}`.")


def acquisition_section(card: ModelCard) -> None:
    """Whether image size / aspect / border give the label away, and the model on re-framed images."""
    section = card.acquisition
    if section is None:
        return
    st.subheader("Acquisition shortcuts: does the frame give the label away?")
    frame = section.frame_features
    names = {"size": "image size and aspect ratio", "border": "border grey level, black share, content aspect",
             "size_and_border": "all of these"}
    st.table([{"predicting the label from": names[name], "accuracy": _num(frame[name]["accuracy"]),
               "balanced accuracy": _num(frame[name]["balanced_accuracy"])} for name in names if name in frame])
    st.caption(f"Majority class alone: accuracy {_num(frame['majority_class_accuracy'])}. The model's own accuracy "
               f"on the same test images: {_num(section.reframed['as_is']['accuracy'])}.")
    labels = {"as_is": "as stored", "pad_4:3": "padded to 4:3", "pad_3:4": "padded to 3:4",
              "crop_4:3": "cropped to 4:3", "crop_3:4": "cropped to 3:4"}
    st.table([{"test images": labels.get(how, how), "accuracy": _num(s["accuracy"]),
               "balanced accuracy": _num(s["balanced_accuracy"]), "macro-F1": _num(s["macro_f1"])}
              for how, s in section.reframed.items()])
    st.caption(f"{section.method}. Command: `{section.command}`.")


def render_card(card: ModelCard) -> None:
    """One card, top to bottom."""
    st.header(card.name)
    st.caption(f"Version {card.version} - {card.arch}, input {card.input_size} px - {card.weights_format} - "
               f"sha256 {card.sha256}")
    if card.data is not None:
        st.markdown(f"**Trained on:** {card.data.trained_on}")
        st.markdown(f"**Source:** {card.data.source}  \n**Licence:** {card.data.licence}")
    st.markdown(f"**Intended use:** {card.intended_use}")
    st.markdown(f"**Image preprocessing** (the same in training and in the app, before resizing to "
                f"{card.input_size} px): {describe_preprocessing(card.preprocessing)}.")
    st.subheader("How it was tested")
    split = card.split
    if split is not None:
        st.markdown(f"**Split:** {split.method}. {split.images} images in {split.split_groups} groups; near-duplicate "
                    f"groups across sides: **{split.near_duplicate_groups_across_splits}**.")
        st.table([{"side": side, **{f"{label} images": n for label, n in per_class.items()},
                   **{f"{k} (patients)" if k == "patients" else f"patients {k}": v
                      for k, v in split.patients_per_split.get(side, {}).items()}}
                  for side, per_class in split.counts.items()])
    metrics_table(card)
    if card.threshold is not None:
        at = card.test_figures.at_threshold
        st.markdown(f"**Operating threshold:** {TASKS[card.key].positive_title} at {card.threshold:.3f} "
                    f"({card.threshold_rule}); on the held-out split sensitivity {_num(at and at.sensitivity)}, "
                    f"specificity {_num(at and at.specificity)}.")
    else:
        st.markdown("**Operating rule:** the most probable class (no threshold).")
    curves(card)
    findings_table(card)
    study_section(card)
    st.subheader("Explanations")
    explanations(card)
    shortcut_audit(card)
    acquisition_section(card)
    if card.guard is not None:
        measured = card.guard.measured
        st.subheader("Wrong-input guard")
        st.markdown("Share of images flagged as not belonging to this model (held-out images):")
        st.table([{"images": name.replace("_", " "), "flagged": _pct(v.get("flagged")), "n": v.get("n")}
                  for name, v in measured.items() if isinstance(v, dict) and "flagged" in v])
    st.subheader("Known limitations")
    st.markdown("\n".join(f"- {item}" for item in card.limitations) or "None recorded.")
    training = card.training
    if training is not None:
        with st.expander("How it was made"):
            st.code(training.command, language="bash")
            st.json({"device": training.device, "hardware": training.hardware, "epochs_run": training.epochs_run,
                     "best_epoch": training.best_epoch, "seconds": training.seconds, "git_commit": training.git_commit,
                     "versions": training.versions, "world_size": training.world_size})
    if card.changelog:
        with st.expander("Changelog"):
            st.table([{"date": c.date, "card schema": c.card_version, "change": c.change} for c in card.changelog])


def feedback_export() -> None:
    """How many verdicts this server holds; the CSV of all of them for its administrator only.

    The count is one SQL count, the export is read from the store only when the button is clicked.
    """
    st.header("Readers' feedback")
    try:
        count = count_feedback()
    except OSError as exc:
        plain.failure("The feedback store on this server cannot be read; the server's log says why.", exc,
                      "feedback store unreadable")
        return
    st.markdown(f"{count} verdicts stored on this server: upload hash, model, model output, verdict, the reader's "
                "class and comment. Never the image.")
    if not admin_token_configured():
        st.caption(f"Export is off on this server: the administrator turns it on by setting {ENV_ADMIN_TOKEN} "
                   "(16 characters or more) and exports here with that token, or on the server with "
                   "`python -m core.feedback export`.")
        return
    token = st.text_input("Administrator token (to export every reader's verdicts)", type="password",
                          key="feedback_token")
    if not token:
        return
    if not is_admin_token(token):
        logger.warning("feedback export refused: wrong administrator token")
        plain.error("That is not this server's administrator token.")
        return
    st.download_button("Download all feedback (CSV)", data=export_feedback, file_name="secondlook-feedback.csv",
                       mime="text/csv", on_click="ignore", disabled=not count, key="feedback_download")


def render_cards_page() -> None:
    """The whole Model cards screen."""
    st.title("Model cards")
    disclaimer()
    keys = sorted(TASKS)
    titles = {key: f"{TASKS[key].title} ({TASKS[key].page})" for key in keys}
    key = st.selectbox("Model", keys, format_func=titles.get, key="card_model")
    try:
        card = get_classifier(key).card
    except (WeightsError, ValueError) as exc:
        plain.model_unavailable(TASKS[key].title, key, exc)
        return
    render_card(card)
    feedback_export()
