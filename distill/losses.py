"""Distillation losses: the student learns the teacher's next-token distributions.

At every answer position the teacher's raw logits over the output vocabulary (525
tokens: the answer tokens plus auxiliary ones carrying "dark knowledge") are the
target distribution, and the teacher's chosen token is the hard label.

- forward_kl: KL(teacher || student), mode-covering; the classic knowledge-distillation
  loss with temperature tau on both sides and the tau^2 factor that keeps its gradient
  scale independent of tau (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
  Neural Network").
- reverse_kl: KL(student || teacher), mode-seeking (Gu et al. 2023, "MiniLLM").
- jsd: generalised Jensen-Shannon divergence with mixture weight beta (Agarwal et al.
  2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes", GKD); beta = 0.5 is the ordinary JSD.
- cross_entropy: on the teacher's chosen tokens (hard labels; Kim & Rush 2016,
  "Sequence-Level Knowledge Distillation").
- kl_weight / DistillLoss: the original pipeline's curriculum, loss = w * KL + (1 - w) * CE
  with w going from 0.9 to 0.1 along a cosine over training; both terms always in the
  gradient. positions=choices keeps only the choice points of the answer automaton, with
  both distributions over the tokens it allows there.

Shapes: logits (B, T, V), mask (B, T) bool (True = a position that counts), targets
(B, T) long (any value where mask is False). Every loss is computed in float32 (inputs
may be bf16/fp16) and is a per-token mean over the positions where mask is True, over
the whole batch (long answers weigh more than short ones, as in next-token training).
A batch with no True position gives 0, still attached to the graph, not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")
SHAPES = ("cosine", "linear", "constant")
POSITIONS = ("all", "choices")
OFF = -1e4
"""The logit a disallowed token gets under positions=choices: exp() underflows to exactly 0, and,
unlike -inf, 0 * (log p - log q) stays 0 rather than NaN."""


def _masked_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per_token (B, T) over the positions where mask (B, T) is True; 0 if none."""
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' positions {tuple(per_token.shape)}")
    mask = mask.bool()
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()  # ()
    return total / mask.sum().clamp_min(1)


def _log_probs(student_logits, teacher_logits, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, T, V)
    return log_s, log_t


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, from log-probabilities: (..., V) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * KL(p_teacher || p_student), both at temperature tau; masked per-token mean."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_t, log_s), mask)  # (B, T) -> ()


def reverse_kl(student_logits, teacher_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 * KL(p_student || p_teacher), both at temperature tau; masked per-token mean."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(_kl(log_s, log_t), mask)  # (B, T) -> ()


def jsd(student_logits, teacher_logits, mask, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """tau^2 * generalised JSD: beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S.

    T, S the teacher's and student's distributions at temperature tau (GKD's convention,
    as in TRL). Both ends vanish (beta -> 0 or 1 makes M equal one side), so beta must be
    strictly between 0 and 1; use forward_kl / reverse_kl for the ends."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta}: must be strictly between 0 and 1")
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)  # (B, T, V)
    per_token = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)  # (B, T)
    return temperature**2 * _masked_mean(per_token, mask)


def cross_entropy(student_logits, targets, mask) -> torch.Tensor:
    """Cross-entropy of the student on the teacher's chosen tokens (output-vocab indices); masked per-token mean."""
    if mask is not None:
        targets = torch.where(mask.bool(), targets, torch.zeros_like(targets))  # any value allowed where masked
    per_token = F.cross_entropy(student_logits.float().flatten(0, -2), targets.flatten(), reduction="none")  # (B*T,)
    return _masked_mean(per_token.view(targets.shape), mask)  # (B, T) -> ()


def kl_weight(progress: float, start: float = 0.9, end: float = 0.1, shape: str = "cosine") -> float:
    """Weight of the KL term at `progress` in [0, 1] of training (clamped).

    cosine: end + (start - end) * 0.5 * (1 + cos(pi * progress)) (the original: 0.9 -> 0.1);
    linear: start + (end - start) * progress; constant: start."""
    p = min(max(float(progress), 0.0), 1.0)
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "linear":
        return start + (end - start) * p
    if shape == "constant":
        return start
    raise ValueError(f"kl_shape={shape!r}: must be one of {', '.join(SHAPES)}")


@dataclass
class DistillLoss:
    """loss = w * KL + (1 - w) * CE, w = kl_weight(progress). Both terms always present."""

    kind: str = "forward_kl"
    """Divergence to the teacher: forward_kl | reverse_kl | jsd."""
    temperature: float = 1.0
    """Softmax temperature tau of the divergence (both sides); the divergence is multiplied by tau^2."""
    kl_start: float = 0.9
    """KL weight at the start of training."""
    kl_end: float = 0.1
    """KL weight at the end of training."""
    kl_shape: str = "cosine"
    """How the KL weight goes from kl_start to kl_end: cosine | linear | constant (= kl_start)."""
    jsd_beta: float = 0.5
    """Mixture weight beta of the generalised JSD (kind = jsd only), strictly in (0, 1)."""
    positions: str = "all"
    """Where the loss looks. all: every answer position, distributions over the whole output vocabulary.
    choices: only the choice points (where the answer automaton allows more than one token), both
    distributions renormalised over the allowed tokens: what constrained decoding compares. Measured on
    held-out comments: the same agreement as all (README, Data); the student then needs constrained decoding."""

    def __post_init__(self):
        def check(ok, name, value, why):
            if not ok:
                raise ValueError(f"loss.{name}={value!r}: {why}")

        check(self.kind in KINDS, "kind", self.kind, f"must be one of {', '.join(KINDS)}")
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        check(0.0 <= self.kl_start <= 1.0, "kl_start", self.kl_start, "must be in [0, 1]")
        check(0.0 <= self.kl_end <= 1.0, "kl_end", self.kl_end, "must be in [0, 1]")
        check(self.kl_shape in SHAPES, "kl_shape", self.kl_shape, f"must be one of {', '.join(SHAPES)}")
        check(0.0 < self.jsd_beta < 1.0, "jsd_beta", self.jsd_beta, "must be strictly between 0 and 1")
        check(self.positions in POSITIONS, "positions", self.positions, f"must be one of {', '.join(POSITIONS)}")

    def divergence(self, student_logits, teacher_logits, mask) -> torch.Tensor:
        if self.kind == "forward_kl":
            return forward_kl(student_logits, teacher_logits, mask, self.temperature)
        if self.kind == "reverse_kl":
            return reverse_kl(student_logits, teacher_logits, mask, self.temperature)
        return jsd(student_logits, teacher_logits, mask, self.temperature, self.jsd_beta)

    def __call__(self, student_logits, teacher_logits, targets, mask, progress: float,
                 allowed: Optional[torch.Tensor] = None) -> dict:
        """dict(loss=, kl=, ce=, kl_weight=): loss for backward; kl and ce detached, for logging; kl_weight a float.

        allowed (B, T, V) bool, the automaton's allowed tokens at each position: needed by positions=choices."""
        if self.positions == "choices":
            if allowed is None:
                raise ValueError("loss.positions=choices needs the allowed tokens at each position")
            mask = mask.bool() & (allowed.sum(-1) > 1)  # (B, T) choice points
            student_logits = student_logits.float().masked_fill(~allowed, OFF)
            teacher_logits = teacher_logits.float().masked_fill(~allowed, OFF)
        w = kl_weight(progress, self.kl_start, self.kl_end, self.kl_shape)
        kl = self.divergence(student_logits, teacher_logits, mask)  # ()
        ce = cross_entropy(student_logits, targets, mask)  # ()
        loss = w * kl + (1.0 - w) * ce
        return dict(loss=loss, kl=kl.detach(), ce=ce.detach(), kl_weight=w)
