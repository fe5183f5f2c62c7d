"""The distillation losses (distill/losses.py) against naive per-position references
and hand-computed values."""

import math

import pytest
import torch

from distill.losses import KINDS, DistillLoss, cross_entropy, forward_kl, jsd, kl_weight, reverse_kl

# -----------------------------------------------------------------------------
# Naive references: one position at a time, explicit formulas


def naive_divergence(student, teacher, mask, temperature, kind, beta=0.5):
    total, count = 0.0, 0
    B, T, V = student.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            s = torch.log_softmax(student[b, t].double() / temperature, dim=-1)
            q = torch.log_softmax(teacher[b, t].double() / temperature, dim=-1)
            if kind == "forward_kl":
                d = sum(q[v].exp() * (q[v] - s[v]) for v in range(V))
            elif kind == "reverse_kl":
                d = sum(s[v].exp() * (s[v] - q[v]) for v in range(V))
            else:
                m = [beta * q[v].exp() + (1 - beta) * s[v].exp() for v in range(V)]
                kl_tm = sum(q[v].exp() * (q[v] - math.log(m[v])) for v in range(V))
                kl_sm = sum(s[v].exp() * (s[v] - math.log(m[v])) for v in range(V))
                d = beta * kl_tm + (1 - beta) * kl_sm
            total += temperature**2 * float(d)
            count += 1
    return total / max(count, 1)


def naive_cross_entropy(student, targets, mask):
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[b, t]:
                total += -float(torch.log_softmax(student[b, t].double(), dim=-1)[targets[b, t]])
                count += 1
    return total / max(count, 1)


def random_batch(B=3, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(B, T, V, generator=g)
    teacher = 2 * torch.randn(B, T, V, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[~mask] = -1  # any value where masked
    return student, teacher, mask, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_match_naive_reference(kind, temperature):
    student, teacher, mask, _ = random_batch()
    fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}[kind]
    got = fn(student, teacher, mask, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(naive_divergence(student, teacher, mask, temperature, kind), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_naive_reference(beta):
    student, teacher, mask, _ = random_batch(seed=1)
    got = jsd(student, teacher, mask, temperature=1.5, beta=beta).item()
    assert got == pytest.approx(naive_divergence(student, teacher, mask, 1.5, "jsd", beta), rel=1e-5)


def test_cross_entropy_matches_naive_reference():
    student, _, mask, targets = random_batch()
    got = cross_entropy(student, targets, mask)
    assert got.item() == pytest.approx(naive_cross_entropy(student, targets, mask), rel=1e-5)


# -----------------------------------------------------------------------------
# Hand-computed: vocabulary of 2, three positions, the last one masked
# position 0: teacher (1/2, 1/2), student (3/4, 1/4); position 1: both equal


def hand_example():
    student = torch.tensor([[[math.log(3.0), 0.0], [1.0, -1.0], [50.0, -50.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [3.0, 1.0], [-50.0, 50.0]]])  # (3, 1) = (1, -1) + 2
    mask = torch.tensor([[True, True, False]])
    targets = torch.tensor([[0, 1, 7]])
    return student, teacher, mask, targets


def test_hand_computed_values():
    student, teacher, mask, targets = hand_example()
    fkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    rkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    m = (0.625, 0.375)
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    p1 = torch.softmax(torch.tensor([1.0, -1.0]), -1)
    ce = (-math.log(0.75) - math.log(p1[1].item())) / 2
    assert forward_kl(student, teacher, mask).item() == pytest.approx(fkl / 2, rel=1e-6)  # 0.0719205
    assert reverse_kl(student, teacher, mask).item() == pytest.approx(rkl / 2, rel=1e-6)  # 0.0654060
    assert jsd(student, teacher, mask).item() == pytest.approx(js / 2, rel=1e-5)  # 0.0169110
    assert cross_entropy(student, targets, mask).item() == pytest.approx(ce, rel=1e-6)
    assert fkl / 2 == pytest.approx(0.0719205, abs=1e-7)


# -----------------------------------------------------------------------------
# Properties


def test_forward_kl_zero_for_equal_distributions_positive_otherwise():
    student, teacher, mask, _ = random_batch()
    for fn in (forward_kl, reverse_kl, jsd):
        assert fn(teacher + 3.0, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts
        assert fn(student, teacher, mask).item() > 0


def test_temperature_scales_by_tau_squared():
    student, teacher, mask, _ = random_batch()
    for fn in (forward_kl, reverse_kl, jsd):
        hot = fn(student, teacher, mask, temperature=2.0)
        assert hot.item() == pytest.approx(4.0 * fn(student / 2.0, teacher / 2.0, mask).item(), rel=1e-5)


def test_mask_excludes_positions():
    student, teacher, mask, targets = random_batch()
    noisy_s, noisy_t, noisy_y = student.clone(), teacher.clone(), targets.clone()
    noisy_s[~mask] = 1e4 * torch.randn_like(noisy_s[~mask])
    noisy_t[~mask] = torch.randn_like(noisy_t[~mask])
    noisy_y[~mask] = 10**6
    for fn in (forward_kl, reverse_kl, jsd):
        assert fn(noisy_s, noisy_t, mask).item() == pytest.approx(fn(student, teacher, mask).item(), rel=1e-6)
    assert cross_entropy(noisy_s, noisy_y, mask).item() == pytest.approx(
        cross_entropy(student, targets, mask).item(), rel=1e-6)
    # a mean per counted token: one position alone gives its own value
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert forward_kl(student, teacher, one).item() == pytest.approx(
        forward_kl(student[:1, :1], teacher[:1, :1], None).item(), rel=1e-6)


def test_all_masked_gives_zero_with_grad_not_nan():
    student, teacher, _, targets = random_batch()
    student.requires_grad_(True)
    none = torch.zeros(student.shape[:2], dtype=torch.bool)
    out = DistillLoss(kind="jsd")(student, teacher, targets, none, progress=0.3)
    for key in ("loss", "kl", "ce"):
        assert out[key].item() == 0.0
    out["loss"].backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    for fn in (forward_kl, reverse_kl, jsd):
        assert fn(student, teacher, none).item() == 0.0


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher, mask, targets = random_batch()
    for dtype in (torch.bfloat16, torch.float16):
        s, t = student.to(dtype), teacher.to(dtype)
        got = forward_kl(s, t, mask, temperature=2.0)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(forward_kl(s.float(), t.float(), mask, temperature=2.0).item(), rel=1e-6)
        assert cross_entropy(s, targets, mask).dtype == torch.float32


def test_shape_mismatch_is_an_error():
    student, teacher, mask, _ = random_batch()
    with pytest.raises(ValueError, match="shape"):
        forward_kl(student, teacher[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        forward_kl(student, teacher, mask[:, :-1])


# -----------------------------------------------------------------------------
# Curriculum


def test_kl_weight_cosine_linear_constant():
    assert kl_weight(0.0) == pytest.approx(0.9)
    assert kl_weight(0.5) == pytest.approx(0.5)
    assert kl_weight(1.0) == pytest.approx(0.1)
    assert kl_weight(0.25) == pytest.approx(0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert kl_weight(-1.0) == pytest.approx(0.9) and kl_weight(2.0) == pytest.approx(0.1)  # clamped
    assert kl_weight(0.25, shape="linear") == pytest.approx(0.7)
    assert kl_weight(0.7, start=0.6, shape="constant") == 0.6
    with pytest.raises(ValueError, match="kl_shape"):
        kl_weight(0.5, shape="step")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0])
def test_distill_loss_blends_kl_and_ce(kind, progress):
    student, teacher, mask, targets = random_batch()
    student.requires_grad_(True)
    loss_fn = DistillLoss(kind=kind, temperature=2.0)
    out = loss_fn(student, teacher, targets, mask, progress)
    w = kl_weight(progress)
    assert out["kl_weight"] == pytest.approx(w)
    torch.testing.assert_close(out["loss"], w * out["kl"] + (1 - w) * out["ce"])
    expected_kl = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}[kind](student, teacher, mask, 2.0)
    torch.testing.assert_close(out["kl"], expected_kl.detach())
    torch.testing.assert_close(out["ce"], cross_entropy(student, targets, mask).detach())
    out["loss"].backward()
    assert student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()


def test_distill_loss_gradient_has_both_terms():
    student, teacher, mask, targets = random_batch()
    w = kl_weight(0.5)
    grads = []
    for fn in (lambda s: DistillLoss()(s, teacher, targets, mask, 0.5)["loss"],
               lambda s: w * forward_kl(s, teacher, mask) + (1 - w) * cross_entropy(s, targets, mask)):
        s = student.clone().requires_grad_(True)
        fn(s).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kind", KINDS)
def test_choices_loss_is_the_loss_over_the_allowed_tokens_at_choice_points(kind):
    """positions=choices equals the plain loss computed by hand on the choice points alone, each
    distribution cut down to its allowed tokens; forced positions and other tokens do not count."""
    torch.manual_seed(1)
    B, T, V = 3, 6, 7
    student, teacher = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    allowed = torch.zeros(B, T, V, dtype=torch.bool)
    allowed[..., 0] = True  # forced everywhere ...
    allowed[:, 1, :3] = allowed[:, 4, 2:6] = True  # ... except two choice points per row
    targets = torch.where(allowed.sum(-1) > 1, 2, 0)
    out = DistillLoss(kind=kind, kl_start=0.5, kl_end=0.5, positions="choices")(
        student, teacher, targets, mask, 0.3, allowed)

    pairs = [(i, t) for i in range(B) for t in range(T) if mask[i, t] and allowed[i, t].sum() > 1]
    assert len(pairs) == 5
    divergence = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}[kind]
    kl = ce = 0.0
    for i, t in pairs:
        a = allowed[i, t]
        one_s, one_t = student[i, t][a][None, None], teacher[i, t][a][None, None]  # (1, 1, allowed)
        kl += divergence(one_s, one_t, None)
        ce += cross_entropy(one_s, torch.tensor([[a.nonzero().flatten().tolist().index(2)]]), None)
    torch.testing.assert_close(out["kl"], kl / len(pairs))
    torch.testing.assert_close(out["ce"], ce / len(pairs))
    with pytest.raises(ValueError, match="allowed tokens"):
        DistillLoss(positions="choices")(student, teacher, targets, mask, 0.3)


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="kl"), "loss.kind"),
    (dict(temperature=0.0), "loss.temperature"),
    (dict(kl_start=1.5), "loss.kl_start"),
    (dict(kl_end=-0.1), "loss.kl_end"),
    (dict(kl_shape="step"), "loss.kl_shape"),
    (dict(jsd_beta=1.0), "loss.jsd_beta"),
    (dict(positions="forced"), "loss.positions"),
])
def test_distill_loss_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + "="):
        DistillLoss(**kwargs)
