"""Surprise objectives: each level learns to predict its own surprise signal.

Nested Learning reads a layer as an associative memory whose "value" for an input is its local
surprise, the gradient of the task loss with respect to the layer's output. We make that an
auxiliary target. For a level l with output y_l (shape [..., d]; R rows = numel / d):

    s_l     = clip(R * dL/dy_l, -c, c)              surprise signal (no gradient flows into it)
    p_l     = P_l(y_l^local)                        the level's prediction of it
    L_aux,l = w_l * mean((p_l - s_l)^2)
    L_total = L + sum_l L_aux,l

* dL/dy_l comes from `torch.autograd.grad(L, y_l, retain_graph=True)` without `create_graph`:
  s_l is a stop-gradient target (a second-order graph through it would only add cost and
  instability), and `autograd.grad` leaves `.grad` untouched, so level-clock accumulation is
  not disturbed.
* The factor R undoes a row-mean in L: for a loss averaged over rows, R * dL/dy_l[r] is the
  gradient of row r's own loss, independent of the batch size, so `c` (gradient_clip_value,
  element-wise) and the weights w_l keep their meaning across batch sizes.
* y_l^local is the level recomputed on its detached input, and P_l is a head owned by the
  level: L_aux,l reaches exactly level l's block and its head, never other levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


class SurpriseLossComputer:
    """Computes the surprise signals s_l and the weighted auxiliary losses (module docstring).

    `loss_weights` names the levels that get an auxiliary loss (w_l >= 0); the others get none.
    `gradient_clip_value` is the element-wise bound c on s_l (None: no clipping).
    """

    def __init__(
        self, loss_weights: Mapping[str, float], gradient_clip_value: float | None = 10.0
    ) -> None:
        for level, weight in loss_weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"surprise weight of {level!r} must be finite and >= 0, got {weight}")
        if gradient_clip_value is not None and not gradient_clip_value > 0:
            raise ValueError(f"gradient_clip_value must be > 0 or None, got {gradient_clip_value}")
        self.loss_weights = dict(loss_weights)
        self.gradient_clip_value = gradient_clip_value

    def _pick(self, tensors: Mapping[str, torch.Tensor], what: str) -> list[torch.Tensor]:
        missing = [level for level in self.loss_weights if level not in tensors]
        if missing:
            raise ValueError(f"no {what} for surprise levels {missing}; got {sorted(tensors)}")
        return [tensors[level] for level in self.loss_weights]

    def compute_surprise_signals(
        self, main_loss: torch.Tensor, activations: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """s_l = clip(R * dL/dy_l) for every weighted level, detached."""
        outputs = self._pick(activations, "activations")
        if not self.loss_weights:
            return {}
        if not all(y.requires_grad for y in outputs):
            raise ValueError("surprise activations must be part of the loss graph (requires_grad)")
        grads = torch.autograd.grad(main_loss, outputs, retain_graph=True)
        signals: dict[str, torch.Tensor] = {}
        for level, y, g in zip(self.loss_weights, outputs, grads, strict=True):
            s = g.detach() * (y.numel() // y.shape[-1])
            if self.gradient_clip_value is not None:
                s = s.clamp(-self.gradient_clip_value, self.gradient_clip_value)
            signals[level] = s
        return signals

    def compute_auxiliary_losses(
        self, surprise_signals: Mapping[str, torch.Tensor], predictions: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """L_aux,l = w_l * mean((p_l - s_l)^2) for every weighted level."""
        preds = self._pick(predictions, "predictions")
        return {
            level: self.loss_weights[level] * F.mse_loss(p, surprise_signals[level])
            for level, p in zip(self.loss_weights, preds, strict=True)
        }

    def compute(
        self,
        main_loss: torch.Tensor,
        activations: Mapping[str, torch.Tensor],
        predictions: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the weighted auxiliary losses, per-level losses) to add to `main_loss`."""
        signals = self.compute_surprise_signals(main_loss, activations)
        losses = self.compute_auxiliary_losses(signals, predictions)
        total = torch.stack(list(losses.values())).sum() if losses else main_loss.new_zeros(())
        return total, losses
