"""Input checks shared by the metric functionals: errors name the argument and its shape."""

from __future__ import annotations

import torch


def check_set(x: torch.Tensor, name: str, rank: int = 4) -> None:
    """``x`` must be a tensor of rank ``rank`` (a (B, N, H, W) set of masks by default)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != rank:
        layout = {4: "(B, N, H, W)", 5: "(B, N, K, H, W)"}.get(rank, f"rank {rank}")
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(x.shape)}")


def check_pair(pred: torch.Tensor, target: torch.Tensor, pred_name: str = "pred", target_name: str = "target") -> None:
    """``pred`` (B, S, H, W) and ``target`` (B, R, H, W) must agree on batch and image size."""
    check_set(pred, pred_name)
    check_set(target, target_name)
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{pred_name} {tuple(pred.shape)} and {target_name} {tuple(target.shape)} must share the batch "
            "size B and the image size (H, W)"
        )
    if pred.device != target.device:
        raise ValueError(f"{pred_name} is on {pred.device} and {target_name} on {target.device}; use one device")


def check_binary(x: torch.Tensor, name: str) -> None:
    """``x`` must hold 0/1 values (bool, integer or float)."""
    if x.dtype == torch.bool:
        return
    if bool(((x != 0) & (x != 1)).any()):
        bad = x[(x != 0) & (x != 1)][0].item()
        raise ValueError(f"{name} must be binary masks (0/1), found the value {bad}")


def check_probabilities(x: torch.Tensor, name: str) -> None:
    """``x`` must be a floating tensor of finite values in [0, 1]."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating-point probabilities, got dtype {x.dtype}")
    low, high = torch.aminmax(x)  # one pass; NaN propagates into both, Inf lands outside [0, 1]
    if bool(torch.isnan(low) | torch.isnan(high)):
        raise ValueError(f"{name} holds NaN; probabilities must be finite values in [0, 1]")
    if low < 0 or high > 1:
        raise ValueError(f"{name} must lie in [0, 1], found values in [{low.item():.4g}, {high.item():.4g}]")


def check_rater_mask(rater_mask: torch.Tensor | None, target: torch.Tensor, name: str = "rater_mask") -> torch.Tensor:
    """The (B, R) bool rater mask, all True when None; every image needs one rater."""
    b, r = target.shape[:2]
    if rater_mask is None:
        return torch.ones(b, r, dtype=torch.bool, device=target.device)
    if not isinstance(rater_mask, torch.Tensor):
        raise TypeError(f"{name} must be a (B, R) bool tensor, got {type(rater_mask).__name__}")
    if rater_mask.shape != (b, r):
        raise ValueError(f"{name} must have shape (B, R) = {(b, r)}, got {tuple(rater_mask.shape)}")
    if rater_mask.dtype != torch.bool:
        check_binary(rater_mask, name)
    rater_mask = rater_mask.to(device=target.device, dtype=torch.bool)
    if not bool(rater_mask.any(dim=1).all()):
        raise ValueError(f"every image needs at least one rater: a row of {name} is all False")
    return rater_mask


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and stored values, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_class_ids(x: torch.Tensor, num_classes: int, name: str) -> None:
    """``x`` must hold integer class ids in [0, num_classes)."""
    if x.is_floating_point():
        raise TypeError(f"{name} must hold integer class ids, got dtype {x.dtype}")
    low, high = torch.stack(torch.aminmax(x.long())).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} holds class ids in [{low}, {high}], outside [0, {num_classes - 1}]")
