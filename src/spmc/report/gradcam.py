"""Figure 7 of the paper: Grad-CAM heat maps of two final global models on clean and triggered test images.

Grad-CAM (Selvaraju et al., ICCV 2017) on a convolutional layer with activations A [B, C, h, w] and the logit
y_c of class c: weights w_c = spatial mean of ∂y_c/∂A_c, CAM = ReLU(Σ_c w_c A_c), upsampled bilinearly to the
input size and divided by its maximum (so each map lies in [0, 1]; an all-zero map stays zero). The layer is the
last convolutional stage of the backbone: ``conv2`` of SimpleCNN, ``layer4`` of ResNet10, otherwise the last
``nn.Conv2d``.

The models are the ``global_state`` of each run's ``checkpoint.pt`` (the last checkpointed round, i.e. the final
model when ``checkpoint_every`` divides the rounds or the run finished), loaded into the run's backbone through
``ParamLayout``. The images are the run's test images, normalised as in training, and the same images with the
pixel trigger of spec §2.2 written in (``apply_trigger`` with the run's ``trigger_values``), exactly the
``test_x`` and ``backdoor_x`` of ``simulation.build_federated_data`` for the base attack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from spmc.attacks.backdoor import apply_trigger, trigger_values
from spmc.config import ConfigError, Experiment, make_experiment
from spmc.data import DATASETS, DataError, Preprocessor, load_dataset, to_unit_float
from spmc.models import ResNet10, SimpleCNN, build_model
from spmc.params import ParamLayout
from spmc.report.runs import dataset_label, method_label
from spmc.store import RunStore, read_json_file

log = logging.getLogger(__name__)


def class_name(dataset: str, idx: int) -> str:
    """Readable name of class ``idx`` of ``dataset`` (:attr:`DatasetInfo.class_names`; the digit itself for MNIST
    and the synthetic set)."""
    info = DATASETS.get(dataset)
    names = info.class_names if info is not None else ()
    return names[idx] if 0 <= idx < len(names) else str(idx)


def target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM looks at: SimpleCNN ``conv2``, ResNet10 ``layer4``, otherwise the last ``Conv2d``."""
    if isinstance(model, SimpleCNN):
        return model.conv2
    if isinstance(model, ResNet10):
        return model.layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, class_idx: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Grad-CAM maps [B, H, W] in [0, 1] of ``model`` (run in eval mode) at ``layer`` for inputs ``x`` [B, C, H, W].

    ``class_idx``: the class whose logit is explained, one int for all images, a tensor [B], or None for each
    image's predicted class. A forward hook captures the layer's output A; ∂logit/∂A comes from
    ``torch.autograd.grad``, so no parameter's ``.grad`` is touched. The model's train/eval mode is restored.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # frozen parameters: make the activation a leaf we can differentiate
            output = output.detach().requires_grad_(True)
        captured["A"] = output
        return output

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            if "A" not in captured:
                raise ValueError("the Grad-CAM layer was not called in the model's forward pass")
            acts = captured["A"]
            if class_idx is None:
                idx = logits.argmax(dim=1)
            elif isinstance(class_idx, int):
                idx = torch.full((x.shape[0],), class_idx, dtype=torch.long, device=logits.device)
            else:
                idx = class_idx.to(device=logits.device, dtype=torch.long).reshape(-1)
            score = logits.gather(1, idx[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


# ------------------------------------------------------------------------------------------------ runs and data


def load_report_config(run_dir: str | Path, data_dir: str | None = None) -> Experiment:
    """The run's configuration on the CPU; ``data_dir`` replaces the stored one. A stored ``data_dir`` that does
    not exist here (a run copied from another machine) is dropped, so ``$SPMC_DATA_DIR`` and the system folders
    are searched instead."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: no config.json; is it a run directory?")
    values = read_json_file(path)
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a JSON object of options")
    if data_dir is not None:
        values["data_dir"] = data_dir
    elif values.get("data_dir") and not Path(values["data_dir"]).expanduser().is_dir():
        log.warning("%s: data_dir %s does not exist here; searching the default places", run_dir, values["data_dir"])
        values["data_dir"] = None
    values["device"] = "cpu"
    return make_experiment(**values)


def load_final_model(run_dir: str | Path, cfg: Experiment) -> nn.Module:
    """The run's backbone holding ``global_state`` from ``checkpoint.pt``, in eval mode on the CPU."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise DataError(f"{run_dir}: no checkpoint.pt (was the run made with checkpoint_every = 0?)")
    payload = RunStore(run_dir).load_checkpoint()
    if payload is None or "global_state" not in payload:
        raise DataError(f"{path}: no 'global_state' entry")
    done = int(payload.get("round", cfg.rounds))
    if done < cfg.rounds:
        log.warning("%s: the checkpoint holds the model after round %d of %d", path, done, cfg.rounds)
    if cfg.defense == "finetuning" and not getattr(cfg, "finetune_broadcast", False):
        log.warning("%s: finetuning evaluates a fine-tuned copy; the checkpoint holds the global model", run_dir)
    model = build_model(cfg.resolved_model, DATASETS[cfg.dataset].num_classes)
    layout = ParamLayout.from_module(model)
    try:
        layout.check(payload["global_state"])
    except ValueError as err:
        raise DataError(f"{path}: global state does not fit model {cfg.resolved_model!r}: {err}") from None
    layout.load(model, payload["global_state"])
    return model.eval()


def load_test_images(
    cfg: Experiment, count: int = 4, indices: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean, triggered, labels, indices): normalised test images of the run's dataset and the same images with
    the trigger. Default images: the first ``count`` whose label is not the backdoor target."""
    info = DATASETS[cfg.dataset]
    raw = load_dataset(
        cfg.dataset, cfg.data_dir, synthetic_size=(cfg.synthetic_train_size, cfg.synthetic_test_size), seed=cfg.seed
    )
    labels = raw.test_labels
    if indices is None:
        candidates = torch.nonzero(labels != cfg.target_label).flatten()
        if count > candidates.numel():
            raise ConfigError(
                f"images: got {count}; the {cfg.dataset} test set has {candidates.numel()} images outside the "
                f"target class, so at most {candidates.numel()}"
            )
        idx = candidates[:count]
    else:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= labels.shape[0]):
            raise ConfigError(f"indices: must lie in 0..{labels.shape[0] - 1}")
    if idx.numel() == 0:
        raise ConfigError("images: no test image to show")
    clean = Preprocessor(info).test(to_unit_float(raw.test_images[idx]))
    values = trigger_values(cfg.trigger_space, info.mean, info.std, cfg.trigger_channels)
    triggered = apply_trigger(clean.clone(), values)
    return clean, triggered, labels[idx], idx


def to_display(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Normalised [B, 3, H, W] → [B, H, W, 3] in [0, 1] for ``imshow``."""
    info = DATASETS[dataset]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


@dataclass
class ModelCams:
    """Grad-CAM maps and predictions of one model on the clean and triggered images."""

    label: str
    cam_clean: torch.Tensor
    cam_triggered: torch.Tensor
    pred_clean: torch.Tensor
    pred_triggered: torch.Tensor


@dataclass
class GradCamComparison:
    """Everything Figure 7 shows: the images, their labels, and each model's maps and predictions."""

    dataset: str
    target: int
    clean: torch.Tensor
    triggered: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    models: list[ModelCams]


def model_cams(model: nn.Module, label: str, clean: torch.Tensor, triggered: torch.Tensor) -> ModelCams:
    """Maps for each image's predicted class, on the clean and on the triggered images."""
    layer = target_layer(model)
    with torch.no_grad():
        pred_c = model(clean).argmax(dim=1)
        pred_t = model(triggered).argmax(dim=1)
    return ModelCams(
        label, grad_cam(model, layer, clean, pred_c), grad_cam(model, layer, triggered, pred_t), pred_c, pred_t
    )


def _run_labels(run_dirs: Sequence[Path], cfgs: Sequence[Experiment]) -> list[str]:
    labels = [method_label(c.defense, c.client) for c in cfgs]
    if len(set(labels)) < len(labels):
        seeds = [c.seed for c in cfgs]
        if len(set(seeds)) == len(seeds):
            labels = [f"{lab} (seed {s})" for lab, s in zip(labels, seeds)]
        else:
            labels = [f"{lab} ({p.name})" for lab, p in zip(labels, run_dirs)]
    return labels


def compare_runs(
    run_dirs: Sequence[str | Path],
    images: int = 4,
    data_dir: str | None = None,
    indices: Sequence[int] | None = None,
) -> GradCamComparison:
    """Load each run's final model and compute its Grad-CAM maps on the first run's test images.

    Raises:
        ConfigError: the runs are on different datasets, or a bad image choice.
        DataError: a run directory lacks its config or checkpoint, or the dataset files are missing.
    """
    paths = [Path(p) for p in run_dirs]
    cfgs = [load_report_config(p, data_dir) for p in paths]
    if len({c.dataset for c in cfgs}) > 1:
        raise ConfigError(f"gradcam: the runs are on different datasets ({', '.join(c.dataset for c in cfgs)})")
    first = cfgs[0]
    trigger = (first.trigger_space, first.trigger_channels)
    if any((c.trigger_space, c.trigger_channels) != trigger for c in cfgs[1:]):
        log.warning("the runs use different triggers; the images carry the first run's")
    clean, triggered, labels, idx = load_test_images(first, images, indices)
    models = [
        model_cams(load_final_model(p, c), lab, clean, triggered)
        for p, c, lab in zip(paths, cfgs, _run_labels(paths, cfgs))
    ]
    return GradCamComparison(first.dataset, first.target_label, clean, triggered, labels, idx, models)


def plot_gradcam(comp: GradCamComparison, alpha: float = 0.5) -> Figure:
    """Rows = images; columns = clean input, each model's map on it, triggered input, each model's map on it.
    Map titles give the model and its predicted class."""
    n = comp.clean.shape[0]
    per_half = 1 + len(comp.models)
    fig = Figure(figsize=(1.9 * 2 * per_half, 2.0 * n + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 2 * per_half, squeeze=False)
    halves = [
        ("clean", to_display(comp.clean, comp.dataset), [(m.cam_clean, m.pred_clean) for m in comp.models]),
        (
            "triggered",
            to_display(comp.triggered, comp.dataset),
            [(m.cam_triggered, m.pred_triggered) for m in comp.models],
        ),
    ]
    target = class_name(comp.dataset, comp.target)
    for i in range(n):
        true = class_name(comp.dataset, int(comp.labels[i]))
        for h, (kind, img, maps) in enumerate(halves):
            base = h * per_half
            ax = axes[i, base]
            ax.imshow(img[i].numpy())
            ax.set_title(f"{kind}: {true}" if kind == "clean" else f"triggered (target {target})", fontsize=8)
            for j, ((cam, pred), m) in enumerate(zip(maps, comp.models)):
                ax = axes[i, base + 1 + j]
                ax.imshow(img[i].numpy())
                ax.imshow(cam[i].cpu().numpy(), cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
                ax.set_title(f"{m.label}: {class_name(comp.dataset, int(pred[i]))}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Grad-CAM on {dataset_label(comp.dataset)} test images (predicted class)")
    return fig
