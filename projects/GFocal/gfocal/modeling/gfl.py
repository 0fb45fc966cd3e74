"""The GFL meta-architecture (Li et al., "Generalized Focal Loss", NeurIPS 2020)."""
import logging
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..config import BOX_REPRESENTATIONS, check_gfl_config, check_size_divisibility
from ..input_checks import check_model_images
from .anchors import flatten_anchors, gfl_anchor_generator, in_stride_units
from .atss import atss_assign, pad_gt_boxes
from .box_voting import DistributionVoting, edge_variances
from .head import GFLHead
from .integral import Integral, boxes_to_distances, distances_to_boxes
from .loss_variants import GFLLossConfig, Positives
from .losses import DFL_TARGET_MARGIN, aligned_iou, all_reduce_mean, distribution_focal_loss, giou_loss
from .uncertainty import distribution_uncertainty, edge_distributions

__all__ = ["GFL"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class GFL(DenseDetector):
    """Generalized Focal Loss detector: ATSS assignment, a joint classification-IoU score trained
    by Quality Focal Loss and a general distribution per box edge trained by Distribution Focal
    Loss plus GIoU. The paper's ablations (Focal Loss, a separate quality branch, Dirac boxes,
    no DFL) are switches of the same class; see :func:`gfocal.add_gfl_config` and
    :mod:`gfocal.modeling.loss_variants`. With ``quality="dgqp"`` it is GFLv2: the score is
    ``sigmoid(cls) x`` the quality predicted from the edge distributions
    (:class:`~gfocal.modeling.dgqp.DGQP`), trained by QFL on that product.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        num_classes: int,
        reg_max: int = 16,
        anchor_scale: float = 8.0,
        anchor_offset: float = 0.0,
        topk: int = 9,
        box_representation: str = "distribution",
        loss: Optional[GFLLossConfig] = None,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        min_box_size_test: float = -1.0,
        output_distributions: bool = False,
        box_voting: Optional[DistributionVoting] = None,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as in :class:`DenseDetector`.
            box_representation: "distribution" (Eq. 5) or "dirac" (``MODEL.GFL.BOX_REPRESENTATION``).
            loss: the loss variant and its settings (None: GFL's defaults, QFL + DFL + GIoU).
            box_voting: distribution voting after NMS (``MODEL.GFL.BOX_VOTING``), or None.
            Other arguments: the ``MODEL.GFL`` keys of the same name (see ``gfocal/config.py``).
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.topk = topk
        self.box_representation = box_representation
        self.loss = loss if loss is not None else GFLLossConfig()
        self.use_dfl = self.loss.use_dfl and box_representation == "distribution"
        _check_head_and_box_representation(head, self.loss, box_representation, reg_max)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.min_box_size_test = min_box_size_test
        self.output_distributions = output_distributions and box_representation == "distribution"
        self.input_format = input_format
        self.box_voting = box_voting

        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in self.head_in_features]
        self.anchor_generator = gfl_anchor_generator(self.strides, anchor_scale, anchor_offset)
        self.integral = Integral(reg_max)

    @classmethod
    def from_config(cls, cfg):
        check_gfl_config(cfg)
        gfl = cfg.MODEL.GFL
        backbone = build_backbone(cfg)
        check_size_divisibility(backbone)
        backbone_shape = backbone.output_shape()
        missing = [f for f in gfl.IN_FEATURES if f not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.GFL.IN_FEATURES={list(gfl.IN_FEATURES)}: {missing} not produced by the "
                f"backbone, which has {sorted(backbone_shape)}"
            )
        head = GFLHead(cfg, [backbone_shape[f] for f in gfl.IN_FEATURES])
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(gfl.IN_FEATURES),
            "num_classes": gfl.NUM_CLASSES,
            "reg_max": gfl.REG_MAX,
            "anchor_scale": gfl.ANCHOR_SCALE,
            "anchor_offset": gfl.ANCHOR_OFFSET,
            "topk": gfl.TOPK,
            "box_representation": gfl.BOX_REPRESENTATION,
            "loss": GFLLossConfig(
                quality=gfl.QUALITY,
                cls_loss=gfl.CLS_LOSS,
                use_dfl=gfl.USE_DFL,
                qfl_beta=gfl.QFL_BETA,
                focal_loss_alpha=gfl.FOCAL_LOSS_ALPHA,
                focal_loss_gamma=gfl.FOCAL_LOSS_GAMMA,
                weights={
                    "loss_cls": gfl.LOSS_CLS_WEIGHT,
                    "loss_box": gfl.LOSS_BOX_WEIGHT,
                    "loss_dfl": gfl.LOSS_DFL_WEIGHT,
                    "loss_quality": gfl.LOSS_QUALITY_WEIGHT,
                },
            ),
            "test_score_thresh": gfl.SCORE_THRESH_TEST,
            "test_topk_candidates": gfl.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": gfl.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "min_box_size_test": gfl.MIN_BOX_SIZE_TEST,
            "output_distributions": gfl.OUTPUT_DISTRIBUTIONS,
            "box_voting": DistributionVoting.from_config(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ------------------------------------------------------------------------------------------
    # Shared pieces
    # ------------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        # NaN/inf pixels: an error; a float image in [0, 1]: a warning (gfocal/input_checks.py).
        check_model_images([x["image"] for x in batched_inputs], self.pixel_mean)
        return super().preprocess_image(batched_inputs)

    def _flatten_predictions(
        self, predictions: Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]
    ) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]:
        """Per level (N, K, Hi, Wi) -> (N, Hi*Wi, K) for logits, box logits and quality."""
        logits, box_logits, quality = predictions
        box_dim = box_logits[0].shape[1]
        logits = [permute_to_N_HWA_K(x, self.num_classes) for x in logits]
        box_logits = [permute_to_N_HWA_K(x, box_dim) for x in box_logits]
        if quality is not None:
            quality = [permute_to_N_HWA_K(x, 1).squeeze(-1) for x in quality]
        return logits, box_logits, quality

    def decode_distances(self, box_logits: Tensor) -> Tensor:
        """Box logits (..., box_dim) -> (l, t, r, b) distances (..., 4) in stride units:
        the integral of the distributions (Eq. 5), or ReLU'd direct distances (Dirac)."""
        if self.box_representation == "distribution":
            return self.integral(box_logits)
        return F.relu(box_logits.float())

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, box_logits, quality = self._flatten_predictions(predictions)
        anchors, strides, num_per_level = flatten_anchors(self.anchor_generator(features), self.strides)
        gt_boxes, gt_valid = pad_gt_boxes([x.gt_boxes.tensor for x in gt_instances])
        gt_classes = torch.full(gt_valid.shape, -1, dtype=torch.long, device=gt_valid.device)
        for i, x in enumerate(gt_instances):
            gt_classes[i, : len(x)] = x.gt_classes
        matched = atss_assign(anchors, num_per_level, gt_boxes, gt_valid, self.topk)
        return self.losses(
            anchors,
            strides,
            cat(logits, dim=1),
            cat(box_logits, dim=1),
            cat(quality, dim=1) if quality is not None else None,
            matched,
            gt_boxes,
            gt_classes,
        )

    def losses(
        self,
        anchors: Tensor,
        strides: Tensor,
        logits: Tensor,
        box_logits: Tensor,
        quality: Optional[Tensor],
        matched: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
    ) -> Dict[str, Tensor]:
        """
        Args:
            anchors: (R, 4) anchors of all levels; strides: (R,) their levels' strides.
            logits: (N, R, C); box_logits: (N, R, box_dim); quality: (N, R) logits of the quality
                branch or of the DGQP (the score is then sigmoid(logits) x sigmoid(quality)), or None.
            matched: (N, R) matched GT index or -1 (:func:`atss_assign`).
            gt_boxes: (N, G, 4) padded GT boxes; gt_classes: (N, G).

        Classification is summed over all anchors and classes and divided by the number of
        positives; GIoU and DFL of each positive are weighted as ``self.loss.variant`` says
        (:mod:`~gfocal.modeling.loss_variants`) and divided by the sum of the weights. Both
        normalisers are averaged over workers.
        """
        variant = self.loss.variant
        if quality is None and variant.head_quality is not None:
            raise ValueError(f"quality={self.loss.quality!r}: the head returned no quality logits")
        pos, pred_boxes, target_boxes, pos_box_logits = self._positives(
            anchors, strides, box_logits, matched, gt_boxes, gt_classes
        )
        num_pos = all_reduce_mean(logits.new_tensor(float(len(pos.img)))).clamp(min=1.0)
        storage = get_event_storage()
        storage.put_scalar("num_pos_anchors", len(pos.img) / logits.shape[0])
        if pos.ious.numel() > 0:
            storage.put_scalar("pos_iou", pos.ious.mean().item())

        loss_cls, scores = variant.classification_loss(logits, quality, pos)
        losses = {"loss_cls": loss_cls / num_pos}
        weights = variant.box_weights(pos, scores)
        weight_sum = all_reduce_mean(weights.sum()).clamp(min=1.0)
        losses["loss_box"] = (giou_loss(pred_boxes, target_boxes) * weights).sum() / weight_sum
        if self.use_dfl:
            dfl = distribution_focal_loss(
                pos_box_logits.reshape(-1, self.reg_max + 1),
                pos.distances.clamp(min=0, max=self.reg_max - DFL_TARGET_MARGIN).reshape(-1),
            )
            losses["loss_dfl"] = (dfl.view(-1, 4).mean(dim=1) * weights).sum() / weight_sum
        target = variant.quality_target(pos)
        if target is not None:  # a separate quality branch (the ablations): BCE
            branch = quality[pos.img, pos.anchor].float()
            losses["loss_quality"] = (
                F.binary_cross_entropy_with_logits(branch, target, reduction="sum") / num_pos
            )
        return {k: v * self.loss.weights[k] for k, v in losses.items()}

    def _positives(
        self,
        anchors: Tensor,
        strides: Tensor,
        box_logits: Tensor,
        matched: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
    ) -> Tuple[Positives, Tensor, Tensor, Tensor]:
        """The positives, their decoded boxes and GT boxes (P, 4) in stride units, and their box
        logits (P, box_dim)."""
        pos_img, pos_anchor = torch.nonzero(matched >= 0, as_tuple=True)
        pos_gt = matched[pos_img, pos_anchor]
        centers, target_boxes = in_stride_units(
            anchors[pos_anchor], strides[pos_anchor, None], gt_boxes[pos_img, pos_gt]
        )
        pos_box_logits = box_logits[pos_img, pos_anchor]
        pred_boxes = distances_to_boxes(centers, self.decode_distances(pos_box_logits))
        pos = Positives(
            img=pos_img,
            anchor=pos_anchor,
            classes=gt_classes[pos_img, pos_gt],
            ious=aligned_iou(pred_boxes.detach(), target_boxes),
            distances=boxes_to_distances(centers, target_boxes),
        )
        return pos, pred_boxes, target_boxes, pos_box_logits

    # ------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------
    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]],
    ) -> List[Instances]:
        # Under autocast (bf16 inference, gfocal/inference/forward.py) backbone and head ran in
        # bf16; scores, decoding, NMS and voting run in float32, outside the autocast region.
        device = images.tensor.device.type
        if not torch.jit.is_tracing() and torch.is_autocast_enabled(device):
            predictions = tuple(
                None if p is None else [t.float() for t in p] for p in predictions
            )
            with torch.autocast(device, enabled=False):
                return self.forward_inference(images, features, predictions)
        logits, box_logits, quality = self._flatten_predictions(predictions)
        anchors = self.anchor_generator(features)
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            scores = [x[img_idx].sigmoid() for x in logits]
            if quality is not None:
                scores = [s * q[img_idx, :, None].sigmoid() for s, q in zip(scores, quality)]
            results.append(
                self.inference_single_image(
                    anchors, scores, [x[img_idx] for x in box_logits], image_size
                )
            )
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        box_logits: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """Per level: the top-k scores that pass the threshold, decoding only their boxes;
        then clip to the image, class-wise NMS and keep the best ``max_detections_per_image``.

        Args:
            anchors: per-level (Ri, 4) anchors; scores: per-level (Ri, C) final scores;
            box_logits: per-level (Ri, box_dim).
        """
        all_boxes, all_scores, all_classes, all_box_logits, all_variances = [], [], [], [], []
        voting = self.box_voting
        num_non_finite = 0
        for anchors_i, scores_i, box_logits_i, stride in zip(anchors, scores, box_logits, self.strides):
            # Top-k of all (anchor, class) scores, then the threshold: the same candidates as
            # thresholding first and sorting, without a nonzero and a sort over every score.
            num_scores = scores_i.shape[0] * scores_i.shape[1]
            if isinstance(num_scores, Tensor):  # a tensor while tracing: keep k dynamic
                num_topk = torch.clamp(num_scores, max=self.test_topk_candidates)
            else:
                num_topk = min(self.test_topk_candidates, num_scores)
            candidate_scores, flat_idxs = scores_i.flatten().topk(num_topk)
            keep = candidate_scores > self.test_score_thresh
            candidate_scores, flat_idxs = candidate_scores[keep], flat_idxs[keep]
            anchor_idxs = torch.div(flat_idxs, scores_i.shape[1], rounding_mode="floor")
            class_idxs = flat_idxs % scores_i.shape[1]
            centers = anchors_i.get_centers()[anchor_idxs]
            candidate_logits = box_logits_i[anchor_idxs]
            boxes_i = distances_to_boxes(centers, self.decode_distances(candidate_logits) * stride)
            # Non-finite head outputs (a diverged model) give NaN/inf boxes: drop them.
            finite = torch.isfinite(boxes_i).all(dim=1)
            num_non_finite = num_non_finite + (~finite).sum()
            candidate_logits = candidate_logits[finite]
            all_boxes.append(boxes_i[finite])
            all_scores.append(candidate_scores[finite])
            all_classes.append(class_idxs[finite])
            if self.output_distributions:
                all_box_logits.append(candidate_logits)
            if voting is not None and voting.needs_variances:  # in pixels^2
                all_variances.append(edge_variances(candidate_logits, self.reg_max) * stride**2)
        if not torch.jit.is_tracing() and int(num_non_finite):
            warnings.warn(
                f"GFL inference: dropped {int(num_non_finite)} candidate boxes with NaN or "
                "infinite coordinates (non-finite head outputs: diverged weights or inputs?)",
                RuntimeWarning,
            )
        boxes = Boxes(cat(all_boxes))
        boxes.clip(image_size)
        scores_all = cat(all_scores)
        classes = cat(all_classes)
        if self.min_box_size_test >= 0:  # as mmdetection's min_bbox_size: drop thin boxes
            valid = torch.nonzero(boxes.nonempty(self.min_box_size_test)).squeeze(1)
            keep = batched_nms(
                boxes.tensor[valid], scores_all[valid], classes[valid], self.test_nms_thresh
            )
            keep = valid[keep]
        else:
            keep = batched_nms(boxes.tensor, scores_all, classes, self.test_nms_thresh)
        keep = keep[: self.max_detections_per_image]
        result = Instances(image_size)
        result.pred_boxes = boxes[keep]
        if voting is not None:  # distribution voting (gfocal/modeling/box_voting.py)
            result.pred_boxes = Boxes(voting(
                boxes.tensor, scores_all, classes, keep, cat(all_variances) if all_variances else None
            ))
        result.scores = scores_all[keep]
        result.pred_classes = classes[keep]
        if self.output_distributions:
            distributions = edge_distributions(cat(all_box_logits)[keep], self.reg_max)
            result.pred_distributions = distributions
            result.pred_uncertainty = distribution_uncertainty(distributions)
        return result



def _check_head_and_box_representation(
    head: nn.Module, loss: GFLLossConfig, box_representation: str, reg_max: int
) -> None:
    """Refuse a box representation, or a :class:`GFLHead` whose outputs do not fit the loss
    variant and ``reg_max`` (a LazyConfig sets the head's arguments apart from the model's)."""
    if box_representation not in BOX_REPRESENTATIONS:
        raise ValueError(
            f"box_representation={box_representation!r} (MODEL.GFL.BOX_REPRESENTATION) is not "
            f"one of {list(BOX_REPRESENTATIONS)}"
        )
    if loss.quality == "dgqp" and box_representation != "distribution":
        raise ValueError(
            "quality='dgqp' (MODEL.GFL.QUALITY) reads the edge distributions: it needs "
            f"box_representation='distribution' (MODEL.GFL.BOX_REPRESENTATION), got {box_representation!r}"
        )
    if not isinstance(head, GFLHead):
        return
    outputs = "dgqp" if head.dgqp is not None else ("branch" if head.quality is not None else None)
    if outputs != loss.variant.head_quality:
        described = {"dgqp": "a DGQP (GFLHead(dgqp=DGQP(...)))",
                     "branch": "a quality branch (GFLHead(with_quality_branch=True))",
                     None: "no quality output (GFLHead(with_quality_branch=False, dgqp=None))"}
        raise ValueError(
            f"quality={loss.quality!r} (MODEL.GFL.QUALITY) needs a head with "
            f"{described[loss.variant.head_quality]}; this head has {described[outputs]}"
        )
    box_dim = 4 * (reg_max + 1) if box_representation == "distribution" else 4
    if head.box_pred.out_channels != box_dim:
        raise ValueError(
            f"GFLHead(box_dim={head.box_pred.out_channels}): box_representation="
            f"{box_representation!r} with reg_max={reg_max} (MODEL.GFL.REG_MAX) needs box_dim "
            f"{box_dim} ({'4 * (reg_max + 1)' if box_dim > 4 else '4 distances'})"
        )
