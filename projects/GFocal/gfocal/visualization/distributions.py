"""Draw detections with their four edge distributions (the paper's Fig. 3 style) into a PNG."""
from typing import Optional, Sequence

import numpy as np

from detectron2.structures import Instances

__all__ = ["draw_distributions"]

SIDES = ("left", "top", "right", "bottom")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def draw_distributions(
    image: np.ndarray,
    instances: Instances,
    indices: Sequence[int],
    output_path: str,
    class_names: Optional[Sequence[str]] = None,
    dpi: int = 100,
) -> None:
    """One row per chosen detection: the image with its box, then the distribution of each side
    over the bins 0..reg_max (units of the detection's FPN stride), its expected value marked.

    Args:
        image: (H, W, 3) uint8 RGB, in the coordinates of ``instances``.
        instances: with ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_distributions``
            (N, 4, bins) and ``pred_uncertainty`` (inference with MODEL.GFL.OUTPUT_DISTRIBUTIONS).
        indices: which detections to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not instances.has("pred_distributions"):
        raise ValueError(
            "instances have no pred_distributions: run inference with "
            "MODEL.GFL.OUTPUT_DISTRIBUTIONS True"
        )
    if len(indices) == 0:
        raise ValueError("no detections chosen to draw (empty indices)")
    bad = [i for i in indices if not 0 <= i < len(instances)]
    if bad:
        raise IndexError(f"detection indices {bad} out of range: there are {len(instances)}")
    boxes = instances.pred_boxes.tensor.cpu().numpy()
    dists = instances.pred_distributions.cpu().float().numpy()
    bins = np.arange(dists.shape[-1])
    fig, axes = plt.subplots(len(indices), 5, figsize=(16, 3.0 * len(indices)), squeeze=False)
    for row, i in enumerate(indices):
        x0, y0, x1, y1 = boxes[i]
        cls = int(instances.pred_classes[i])
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        ax = axes[row, 0]
        ax.imshow(image)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2))
        ax.set_title(
            f"#{i} {name} {float(instances.scores[i]):.2f}, "
            f"uncertainty {float(instances.pred_uncertainty[i]):.2f}",
            fontsize=9,
        )
        ax.axis("off")
        for side, (ax, label, color) in enumerate(zip(axes[row, 1:], SIDES, COLORS)):
            p = dists[i, side]
            ax.bar(bins, p, color=color, width=0.8)
            ax.axvline(float((p * bins).sum()), color="black", ls="--", lw=1)
            ax.set_ylim(0, 1)
            ax.set_xticks(bins[:: max(1, len(bins) // 8)])
            ax.set_title(f"{label}", fontsize=9)
            ax.set_xlabel("distance (bins of the level's stride)", fontsize=8)
    fig.tight_layout()
    fig.savefig(output_path, dpi=dpi)
    plt.close(fig)
