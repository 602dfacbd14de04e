"""The fixed words a DICOM tag value may be told in: modality, body part, plane.

A tag value is shown on a page, written in a report, a refusal or a table only when it is one
of these words; any other value is told as "another modality" or "another body part". Tags are
free text in practice (a BodyPartExamined of "DOE^JANE MRN-0042" was seen reaching the page and
the PDF), and even a value that is a valid DICOM code string ("JANE DOE 1970") can name a person.
"""

from __future__ import annotations

# DICOM modality codes (PS3.3 C.7.3.1.1.1) the app can meet.
MODALITIES = frozenset({"CT", "MR", "CR", "DX", "DR", "US", "NM", "PT", "XA", "RF", "MG", "OT", "SC", "IO", "PX", "ES",
                        "XC", "OP", "SM", "RG", "SEG", "SR", "KO", "PR"})
# Body Part Examined defined terms (PS3.16 CID 4031) and the spellings scanners use for the app's regions.
BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "HEADNECK", "NEURO", "NECK", "CHEST", "THORAX", "LUNG", "PORT CHEST",
                        "CHEST_TO_PELVIS", "CHESTABDOMEN", "CHEST ABDOMEN", "CHESTABDPELVIS", "ABDOMEN", "PELVIS",
                        "ABDOMENPELVIS", "SPINE", "CSPINE", "TSPINE", "LSPINE", "EXTREMITY", "HAND", "FOOT", "KNEE",
                        "HIP", "SHOULDER", "BREAST", "HEART", "WHOLEBODY"})
PLANES = frozenset({"axial", "coronal", "sagittal"})


def known_modality(value: object) -> str | None:
    """The modality code if it is one of `MODALITIES` (case and surrounding spaces ignored), else None."""
    code = str(value or "").strip().upper()
    return code if code in MODALITIES else None


def known_body_part(value: object) -> str | None:
    """The body part if it is one of `BODY_PARTS` (case and surrounding spaces ignored), else None."""
    part = str(value or "").strip().upper()
    return part if part in BODY_PARTS else None


def modality_words(value: object) -> str:
    """"CT", or "another modality" for a value outside the vocabulary ("" for none)."""
    if not str(value or "").strip():
        return ""
    return known_modality(value) or "another modality"


def body_part_words(value: object) -> str:
    """"CHEST", or "another body part" for a value outside the vocabulary ("" for none)."""
    if not str(value or "").strip():
        return ""
    return known_body_part(value) or "another body part"
