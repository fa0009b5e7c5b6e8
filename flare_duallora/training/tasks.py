"""What a network is trained for, and how a site evaluates it: one object per task (classification, segmentation).

A :class:`Task` owns everything that differs between tasks: how a batch's targets are read, how batches are
collated, how the personalised and the global-only model are evaluated and which metrics are written.  The site
trainer asks its task; nothing else branches on the task's name.  :func:`detect_task` reads the task from a bundle
(metadata ``network_data_format.outputs.pred``, ``validate#key_metric``, the shape of the network's output) unless
the job sets it (``task = "segmentation"``); :meth:`Task.problems` says what a bundle lacks for the task's evaluation,
so preflight refuses it before the job runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from flare_duallora.metrics import classification_metrics, segmentation_metrics
from flare_duallora.training.batch import labels_of, logits_of

if TYPE_CHECKING:  # pragma: no cover
    from flare_duallora.bundle import BundleRuntime

# ``trainer`` below is a :class:`flare_duallora.training.site.SiteTrainer` (not imported: site imports this module)

__all__ = ["TASKS", "TASK_SETTINGS", "ClassificationTask", "SegmentationTask", "Task", "TaskChoice", "detect_task",
           "make_task"]

EVAL_KINDS = ("personalised", "global_only")


class Task:
    """The interface every task implements (classification is the default)."""

    name = "task"
    headline = ""  # the metric progress lines show
    #: the metrics the summary table shows, in order
    table_metrics: tuple[str, ...] = ()

    def labels(self, batch: Mapping, key: str) -> torch.Tensor:
        """What the loss compares the network's output with."""
        raise NotImplementedError

    collate_fn: Optional[Callable] = None  # None: torch's default collation

    def evaluate(self, trainer: Any, loader: Optional[Iterable], kinds: Sequence[str]) -> dict[str, dict]:
        raise NotImplementedError

    @staticmethod
    def problems(runtime: "BundleRuntime") -> list[str]:
        """What ``runtime`` lacks for this task's training and evaluation (one line each; empty: nothing)."""
        return []


class ClassificationTask(Task):
    """One label per image; probabilities per class; balanced accuracy, sensitivity, specificity, MCC, AUC."""

    name = "classification"
    headline = "balanced_accuracy"
    table_metrics = ("balanced_accuracy", "sensitivity", "specificity", "mcc", "auc")

    def __init__(self, num_classes: Optional[int] = None, label_names: Optional[list[str]] = None):
        self.num_classes, self.label_names = num_classes, label_names

    def labels(self, batch: Mapping, key: str) -> torch.Tensor:
        return labels_of(batch, key)

    def evaluate(self, trainer: Any, loader: Optional[Iterable], kinds: Sequence[str]) -> dict[str, dict]:
        preds = trainer._predict(loader, tuple(k for k in EVAL_KINDS if k in kinds))
        return {k: classification_metrics(y, p, self.num_classes, self.label_names) for k, (y, p) in preds.items()}


# ---------------------------------------------------------------------------------------------- segmentation
#: ``validate#key_metric`` handlers recomputed with monai.metrics (name of the handler class -> builder)
def _key_metric_fn(raw: Mapping) -> Optional[Callable]:
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    target = str(raw.get("_target_", "")).rsplit(".", 1)[-1]
    include_background = bool(raw.get("include_background", True))
    if target == "MeanDice":
        return lambda: DiceMetric(include_background=include_background, reduction="mean")
    if target in ("MeanIoUHandler", "MeanIoU"):
        return lambda: MeanIoU(include_background=include_background, reduction="mean")
    if target == "HausdorffDistance":
        pct = raw.get("percentile")
        return lambda: HausdorffDistanceMetric(include_background=include_background, reduction="mean",
                                               percentile=None if pct is None else float(pct))
    return None


class SegmentationTask(Task):
    """A class per voxel.  Training uses the bundle's loss on its (multi-crop) batches; evaluation runs the bundle's
    ``validate#inferer`` (e.g. a sliding window over whole volumes) and ``validate#postprocessing``, then Dice per
    foreground class and their mean, the 95 % Hausdorff distance (in voxels), and the bundle's ``validate#key_metric``
    under its own name, each with ``monai.metrics``; ``n`` is the number of validation volumes."""

    name = "segmentation"
    headline = "dice"
    table_metrics = ("dice", "hd95")

    def __init__(self, num_classes: int, label_names: Optional[list[str]] = None, inferer: Any = None,
                 postprocessing: Optional[Callable] = None, key_metrics: Optional[dict] = None,
                 image_key: str = "image", label_key: str = "label"):
        self.num_classes = int(num_classes)
        names = list(label_names or [])
        self.label_names = names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.key_metrics = dict(key_metrics or {})  # name -> factory of a monai.metrics Cumulative metric

    @property
    def collate_fn(self):  # several crops per item (RandCropByPosNegLabeld num_samples) become one batch
        from monai.data import list_data_collate

        return list_data_collate

    def labels(self, batch: Mapping, key: str) -> torch.Tensor:
        y = batch[key]
        return y.as_tensor() if hasattr(y, "as_tensor") else torch.as_tensor(y)

    @classmethod
    def from_bundle(cls, runtime: "BundleRuntime", num_classes: Optional[int] = None,
                    label_names: Optional[list[str]] = None) -> "SegmentationTask":
        c = num_classes or runtime.num_classes
        if c is None:
            raise ValueError(cls._classes_problem(runtime))
        key_metrics = {}
        raw = runtime.get("validate#key_metric")
        if isinstance(raw, Mapping):
            for name, spec in raw.items():
                fn = _key_metric_fn(spec) if isinstance(spec, Mapping) else None
                if fn is not None:
                    key_metrics[str(name)] = fn
        return cls(c, label_names or runtime.label_names, runtime.parsed("validate#inferer", None),
                   runtime.parsed("validate#postprocessing", None), key_metrics)

    @staticmethod
    def _classes_problem(runtime) -> str:
        return (f"bundle {runtime.bundle_root}: a segmentation bundle must say how many classes its output has: "
                f"none of the config ids 'num_classes', 'network_def#out_channels' nor the metadata "
                f"network_data_format.outputs.pred.num_channels is set")

    @staticmethod
    def problems(runtime: "BundleRuntime") -> list[str]:
        out = []
        if runtime.num_classes is None:
            out.append(SegmentationTask._classes_problem(runtime))
        if not runtime.has("loss"):
            out.append(f"bundle {runtime.bundle_root}: a segmentation bundle needs its training loss as config id "
                       f"'loss' (e.g. DiceCELoss); map another id with bundle_ids = {{'loss': '<its id>'}}")
        for id in ("validate#inferer", "validate#postprocessing"):
            if runtime.has(id):
                try:
                    runtime.parsed(id)
                except ValueError as e:
                    out.append(str(e))
        return out

    # ------------------------------------------------------------------ evaluation
    def _post(self, pred: torch.Tensor, label: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per volume: the bundle's postprocessing of ``{"pred", "label"}``, then one-hot ``(C, ...)`` pred and label."""
        from monai.data import decollate_batch
        from monai.networks.utils import one_hot

        items = decollate_batch({"pred": pred, "label": label})
        out = []
        for i, item in enumerate(items):
            if self.postprocessing is not None:
                try:
                    item = self.postprocessing(item)
                except Exception as e:  # noqa: BLE001 - say which step failed
                    from flare_duallora.bundle.runtime import innermost

                    raise ValueError(f"validate#postprocessing failed on validation volume {i} of a batch: "
                                     f"{innermost(e)}") from None
            p, y = torch.as_tensor(item["pred"]), torch.as_tensor(item["label"])
            if self.postprocessing is None or p.shape[0] != self.num_classes:
                if p.shape[0] == self.num_classes and self.postprocessing is None:
                    p = p.argmax(0, keepdim=True)
                p = one_hot(p[None].long(), self.num_classes, dim=1)[0]
            if y.shape[0] != self.num_classes:
                y = one_hot(y[None].long(), self.num_classes, dim=1)[0]
            out.append((p.float(), y.float()))
        return out

    def evaluate(self, trainer: Any, loader: Optional[Iterable], kinds: Sequence[str]) -> dict[str, dict]:
        from monai.inferers import SimpleInferer

        loader = loader if loader is not None else trainer.val_loader
        if loader is None:
            raise ValueError("no validation data configured for this site")
        net = trainer.adapted.net
        inferer = self.inferer or SimpleInferer()
        forward = lambda x: logits_of(net(x))  # noqa: E731 - a network returning (logits, ...) as MONAI's ViT does
        same = not trainer._has_private_lora()
        runs = [k for k in EVAL_KINDS if k in kinds and not (k == "global_only" and same and "personalised" in kinds)]
        out: dict[str, dict] = {}
        was_training = net.training
        net.eval()
        try:
            for kind in runs:
                pairs, spacings = [], []
                ctx = trainer.adapted.private_adapters_disabled() if kind == "global_only" else contextlib.nullcontext()
                with ctx, torch.inference_mode(), trainer._autocast():
                    for batch in loader:
                        x = batch[trainer.image_key]
                        pred = inferer(x.to(trainer.device), forward).float().cpu()
                        volumes = self._post(pred, self.labels(batch, trainer.label_key).cpu())
                        pairs += volumes
                        spacings += voxel_sizes(x, len(volumes))
                if not pairs:
                    raise ValueError("the validation data set is empty")
                out[kind] = self.metrics(pairs, spacings)
        finally:
            net.train(was_training)
        if "global_only" in kinds and "global_only" not in out:
            out["global_only"] = dict(out["personalised"])
        return out

    def metrics(self, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                spacings: Optional[Sequence[Optional[Sequence[float]]]] = None) -> dict:
        """Dice, HD95 (mm where every volume's ``spacings`` is known, else voxels) and the bundle's key metrics."""
        preds = [p[None] for p, _ in pairs]
        labels = [y[None] for _, y in pairs]
        out = segmentation_metrics(preds, labels, self.label_names, spacings)
        for name, factory in self.key_metrics.items():
            metric = factory()
            for p, y in zip(preds, labels):
                metric(y_pred=p, y=y)
            value = float(metric.aggregate().mean())
            out[name] = value if math.isfinite(value) else None
        return out


def voxel_sizes(images: Any, n: int) -> list[Optional[tuple]]:
    """Each of a batch's ``n`` volumes' voxel size in mm, read from its MetaTensor affine after the bundle's
    transforms (the grid the prediction is on); ``None`` for images that carry no affine."""
    pixdim = getattr(images, "pixdim", None)
    if pixdim is None:
        return [None] * n
    rows = pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * n
    if len(rows) != n:
        return [None] * n
    return [tuple(float(v) for v in torch.as_tensor(r).flatten().tolist()) for r in rows]


#: task name -> class (a new task enters here)
TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "segmentation": SegmentationTask}
#: values of the job setting ``task``
TASK_SETTINGS = ("auto",) + tuple(TASKS)

_SEG_METRICS = {"MeanDice", "MeanIoUHandler", "MeanIoU", "HausdorffDistance", "SurfaceDistance", "SurfaceDiceMetric"}
_CLS_METRICS = {"Accuracy", "ROCAUC", "ConfusionMatrix", "AveragePrecision"}


@dataclass
class TaskChoice:
    """The task a bundle is trained for (None when it cannot be told) and how that was decided."""

    name: Optional[str]
    reason: str


def detect_task(runtime: "BundleRuntime", setting: str = "auto", net: Optional[torch.nn.Module] = None) -> TaskChoice:
    """The task: the job's ``task`` setting when not ``auto``; else the bundle's metadata
    ``network_data_format.outputs.pred`` (``type`` image / ``format`` segmentation vs ``probabilities`` / ``classes``),
    else its ``validate#key_metric`` (MeanDice ... vs Accuracy ...), else the shape of ``net``'s output on an input of
    the metadata's ``inputs.image`` shape (spatial: segmentation; ``(N, C)``: classification)."""
    if setting not in TASK_SETTINGS:
        raise ValueError(f"setting 'task' = {setting!r}: expected one of {TASK_SETTINGS}")
    if setting != "auto":
        return TaskChoice(setting, f"set by the job (task = {setting!r})")
    pred = runtime._pred_meta()
    kind, fmt = str(pred.get("type", "")).lower(), str(pred.get("format", "")).lower()
    where = f"metadata network_data_format.outputs.pred of {runtime.meta_file}"
    if kind == "image" or fmt in ("segmentation", "labels"):
        return TaskChoice("segmentation", f"{where}: type {kind!r}, format {fmt!r}")
    if kind in ("probabilities", "logits", "vector") or fmt == "classes":
        return TaskChoice("classification", f"{where}: type {kind!r}, format {fmt!r}")
    raw = runtime.get("validate#key_metric")
    if isinstance(raw, Mapping):
        targets = {str(v.get("_target_", "")).rsplit(".", 1)[-1] for v in raw.values() if isinstance(v, Mapping)}
        if targets & _SEG_METRICS:
            return TaskChoice("segmentation", f"validate#key_metric uses {sorted(targets & _SEG_METRICS)}")
        if targets & _CLS_METRICS:
            return TaskChoice("classification", f"validate#key_metric uses {sorted(targets & _CLS_METRICS)}")
    shape = _output_shape(runtime, net)
    if shape is not None:
        name = "segmentation" if len(shape) > 2 else "classification"
        return TaskChoice(name, f"the network's output has shape {list(shape)}")
    return TaskChoice(None, f"cannot tell whether bundle {runtime.bundle_root} classifies or segments: {where} has no "
                            f"type/format, validate#key_metric names no known metric, and the metadata gives no "
                            f"inputs.image shape to try the network on; set task = 'classification' or "
                            f"'segmentation'")


def _output_shape(runtime, net: Optional[torch.nn.Module]) -> Optional[tuple]:
    image = runtime.metadata.get("network_data_format", {}).get("inputs", {}).get("image", {})
    if net is None or not isinstance(image, Mapping):
        return None
    shape, channels = image.get("spatial_shape"), image.get("num_channels")
    if not isinstance(channels, int) or not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
        return None
    was = net.training
    net.eval()
    try:
        with torch.inference_mode():
            return tuple(logits_of(net(torch.zeros(1, channels, *shape))).shape)
    except Exception:  # noqa: BLE001 - the shape is only a hint
        return None
    finally:
        net.train(was)


def make_task(name: str, runtime: Optional["BundleRuntime"] = None, num_classes: Optional[int] = None,
              label_names: Optional[list[str]] = None) -> Task:
    """The task object for ``name`` (built from the bundle where it needs the bundle's inferer and metrics)."""
    if name == "segmentation":
        if runtime is None:
            return SegmentationTask(num_classes or 2, label_names)
        return SegmentationTask.from_bundle(runtime, num_classes, label_names)
    if name == "classification":
        return ClassificationTask(num_classes, label_names)
    raise ValueError(f"unknown task {name!r}: expected one of {tuple(TASKS)}")
