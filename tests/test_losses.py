"""KD losses against naive computations written out here (loops over elements, math.exp/log)."""
from __future__ import annotations

import math

import pytest
import torch

from kdserve import registry
from student_workers import losses as L

pytestmark = pytest.mark.unit

torch.manual_seed(0)


# ---------------------------------------------------------------- naive helpers (pure python)


def naive_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    m = max(row)
    exps = [math.exp((x - m) / temperature) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def naive_kl(p: list[float], q: list[float]) -> float:
    return sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q) if pj > 0)


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(-1, x.shape[-1]).tolist()


# ---------------------------------------------------------------- section 1: response KD


def test_kd_kl_matches_naive_loop():
    u, z, temp = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), 2.5
    expected = 0.0
    for ur, zr in zip(rows(u), rows(z)):
        expected += temp**2 * naive_kl(naive_softmax(zr, temp), naive_softmax(ur, temp))
    expected /= 4
    assert L.kd_kl(u, z, temp).item() == pytest.approx(expected, rel=1e-10)


def test_kd_kl_hand_derived_two_classes():
    # Teacher logits (0, 0) -> p = (1/2, 1/2); student (ln 3, 0) -> q = (3/4, 1/4); T = 1:
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    u = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    z = torch.zeros(1, 2, dtype=torch.float64)
    assert L.kd_kl(u, z, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)


def test_kd_kl_t_squared_scaling():
    u, z = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    for temp in (1.0, 2.0, 4.0):
        plain = sum(naive_kl(naive_softmax(zr, temp), naive_softmax(ur, temp)) for ur, zr in zip(rows(u), rows(z))) / 3
        assert L.kd_kl(u, z, temp).item() == pytest.approx(temp**2 * plain, rel=1e-10)


def test_kd_kl_gradient_scale_independent_of_temperature():
    # Hinton et al.: at high T, d(T^2 KL)/du_i -> (u_i - z_i) / C for zero-mean logits,
    # whatever T is; without the T^2 factor it would shrink as 1/T^2. Batch mean divides by B.
    # The approximation error is O(1/T) in absolute terms, so compare against the gradient's scale.
    c, b = 5, 2
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, c, dtype=torch.float64, generator=g)
    z = z - z.mean(dim=-1, keepdim=True)
    u0 = torch.randn(b, c, dtype=torch.float64, generator=g)
    u0 = u0 - u0.mean(dim=-1, keepdim=True)
    expected = (u0 - z) / c / b
    grads = []
    for temp in (50.0, 200.0):
        u = u0.clone().requires_grad_(True)
        L.kd_kl(u, z, temp).backward()
        assert torch.allclose(u.grad, expected, rtol=0, atol=0.03 * expected.abs().max().item())
        grads.append(u.grad)
    # and the error shrinks as T grows (the limit really is T-independent)
    assert (grads[1] - expected).abs().max() < (grads[0] - expected).abs().max()


def test_kd_kl_zero_when_equal_and_mask():
    z = torch.randn(2, 3, 7)
    assert L.kd_kl(z.clone(), z, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    u = torch.randn(2, 3, 7, dtype=torch.float64)
    z = torch.randn(2, 3, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = [(0, 0), (0, 1), (1, 0)]
    expected = sum(
        naive_kl(naive_softmax(z[b, t].tolist(), 2.0), naive_softmax(u[b, t].tolist(), 2.0)) for b, t in kept
    ) * 4.0 / len(kept)
    assert L.kd_kl(u, z, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-10)


def test_kd_kl_masked_teacher_class_is_finite():
    u = torch.zeros(1, 3, dtype=torch.float64)
    z = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64)
    # p = (1/2, 1/2, 0), q = (1/3, 1/3, 1/3): KL = ln(3/2)
    assert L.kd_kl(u, z).item() == pytest.approx(math.log(1.5), rel=1e-12)
    assert L.soft_cross_entropy(u, z).item() == pytest.approx(math.log(3.0), rel=1e-12)


def test_logits_mse_naive():
    u, z = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = sum((a - b) ** 2 for ur, zr in zip(rows(u), rows(z)) for a, b in zip(ur, zr)) / 12
    assert L.logits_mse(u, z).item() == pytest.approx(expected, rel=1e-12)


def test_soft_cross_entropy_naive_and_entropy_gap():
    u, z = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    tau = 1.5
    ce = ent = 0.0
    for ur, zr in zip(rows(u), rows(z)):
        p, q = naive_softmax(zr, tau), naive_softmax(ur, tau)
        ce += -sum(pj * math.log(qj) for pj, qj in zip(p, q)) / 3
        ent += -sum(pj * math.log(pj) for pj in p) / 3
    got = L.soft_cross_entropy(u, z, temperature=tau).item()
    assert got == pytest.approx(ce, rel=1e-12)
    # CE(q, p) = H(p) + KL(p || q): differs from kd_kl / T^2 by the teacher entropy only.
    assert got - L.kd_kl(u, z, tau).item() / tau**2 == pytest.approx(ent, rel=1e-10)


def test_kd_kl_topk_equals_full_when_k_is_num_classes():
    u, z = torch.randn(4, 9), torch.randn(4, 9)
    # Identity "top-k" order: the same arithmetic as kd_kl, so bitwise equal.
    idx = torch.arange(9).expand(4, 9)
    assert torch.equal(L.kd_kl_topk(u, z, idx, 2.0), L.kd_kl(u, z, 2.0))
    # Sorted order from torch.topk: a permutation, equal up to summation order.
    u64, z64 = u.double(), z.double()
    vals, idx = z64.topk(9, dim=-1)
    assert torch.allclose(L.kd_kl_topk(u64, vals, idx, 2.0), L.kd_kl(u64, z64, 2.0), rtol=1e-12, atol=0)


def test_kd_kl_topk_approximation_naive():
    u, z = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    k, temp = 3, 2.0
    vals, idx = z.topk(k, dim=-1)
    expected = 0.0
    for b in range(2):
        p = naive_softmax(vals[b].tolist(), temp)  # renormalised over the top-k support
        q_all = naive_softmax(u[b].tolist(), temp)  # student normalised over all classes
        q = [q_all[j] for j in idx[b].tolist()]
        expected += temp**2 * sum(pj * math.log(pj / qj) for pj, qj in zip(p, q)) / 2
    assert L.kd_kl_topk(u, vals, idx, temp).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError):
        L.kd_kl_topk(u, torch.randn(2, 7), torch.zeros(2, 7, dtype=torch.long))


# ---------------------------------------------------------------- gradients reach the student only


def _student_teacher(*shape):
    s = torch.randn(*shape, requires_grad=True)
    t = torch.randn(*shape, requires_grad=True)  # as if it still carried a graph
    return s, t


@pytest.mark.parametrize(
    "loss",
    [
        lambda s, t: L.kd_kl(s, t, 2.0),
        lambda s, t: L.kd_kl_topk(s, *t.topk(3, dim=-1), temperature=2.0),
        L.soft_cross_entropy,
        L.logits_mse,
        lambda s, t: L.feature_loss(s, t, "mse"),
        lambda s, t: L.feature_loss(s, t, "l1"),
        lambda s, t: L.feature_loss(s, t, "cosine"),
        lambda s, t: L.data2vec_loss([s, s * 2], t),
        lambda s, t: L.token_nce(s, t, torch.randn(5, 6), tau=0.5),
    ],
)
def test_gradients_reach_student_only(loss):
    s, t = _student_teacher(2, 3, 6)
    loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("loss", [L.attention_mse_per_head, L.attention_mse_head_mean])
def test_attention_gradients_reach_student_only(loss):
    s = torch.randn(2, 2, 3, 3).softmax(-1).requires_grad_(True)
    t = torch.randn(2, 2, 3, 3).softmax(-1).requires_grad_(True)
    loss(s, t).backward()
    assert s.grad is not None and t.grad is None


# ---------------------------------------------------------------- section 2: feature KD


def _naive_feature(s, t, kind, mask):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b][i]:
                continue
            a, c = s[b][i].tolist(), t[b][i].tolist()
            if kind == "mse":
                d = sum((x - y) ** 2 for x, y in zip(a, c)) / len(a)
            elif kind == "l1":
                d = sum(abs(x - y) for x, y in zip(a, c)) / len(a)
            else:
                dot = sum(x * y for x, y in zip(a, c))
                d = 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in c)))
            total, count = total + d, count + 1
    return total / count


@pytest.mark.parametrize("kind", ["mse", "l1", "cosine"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_feature_loss_naive(kind, with_mask):
    s, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]) if with_mask else None
    got = L.feature_loss(s, t, kind, mask=mask).item()
    assert got == pytest.approx(_naive_feature(s, t, kind, mask), rel=1e-10)


def test_feature_loss_padding_values_do_not_matter():
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    s2 = s.clone()
    s2[mask == 0] = 1e3  # garbage on padded tokens
    assert torch.allclose(L.feature_loss(s, t, mask=mask), L.feature_loss(s2, t, mask=mask))


def test_feature_loss_errors():
    with pytest.raises(KeyError, match="unknown feature_distance .huber.; known: cosine, l1, mse"):
        L.feature_loss(torch.zeros(1, 2), torch.zeros(1, 2), kind="huber")
    with pytest.raises(ValueError, match="Projection"):
        L.feature_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_projection():
    assert L.Projection(8, 8).is_identity
    x = torch.randn(2, 3, 8)
    assert torch.equal(L.Projection(8, 8)(x), x)
    assert not L.Projection(8, 8, force=True).is_identity
    proj = L.Projection(8, 5)
    assert not proj.is_identity and proj(x).shape == (2, 3, 5)
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    L.feature_loss(s, t, projection=proj).backward()
    assert proj.proj.weight.grad is not None


# ---------------------------------------------------------------- section 3: Data2Vec targets


def naive_data2vec_target(layers: list[torch.Tensor], eps: float) -> list[list[list[float]]]:
    """Instance norm per channel over tokens, mean over layers, plain layer norm over channels."""
    b_n, t_n, d_n = layers[0].shape
    out = []
    for b in range(b_n):
        avg = [[0.0] * d_n for _ in range(t_n)]
        for h in layers:
            x = h[b].tolist()
            for d in range(d_n):
                col = [x[j][d] for j in range(t_n)]
                mu = sum(col) / t_n
                var = sum((c - mu) ** 2 for c in col) / t_n
                for j in range(t_n):
                    avg[j][d] += (x[j][d] - mu) / math.sqrt(var + eps) / len(layers)
        y = []
        for j in range(t_n):
            mu = sum(avg[j]) / d_n
            var = sum((v - mu) ** 2 for v in avg[j]) / d_n
            y.append([(v - mu) / math.sqrt(var + eps) for v in avg[j]])
        out.append(y)
    return out


def test_data2vec_loss_naive_with_different_depths():
    eps = 1e-5
    student = [torch.randn(2, 3, 4) for _ in range(2)]  # L_s = 2
    teacher = [torch.randn(2, 3, 4) * 3 + 1 for _ in range(5)]  # L_t = 5
    y_t = torch.tensor(naive_data2vec_target(teacher, eps))
    y_s = naive_data2vec_target(student, eps)
    expected = sum(
        (y_s[b][j][d] - y_t[b, j, d].item()) ** 2 for b in range(2) for j in range(3) for d in range(4)
    ) / (2 * 3 * 4)
    assert L.data2vec_loss(student, y_t, eps=eps).item() == pytest.approx(expected, rel=1e-4)


def test_data2vec_loss_mask_equals_unpadded():
    # A padded sample with its mask must give the loss of the same sample without padding.
    eps = 1e-5
    student = [torch.randn(1, 5, 4) for _ in range(3)]
    teacher = [torch.randn(1, 5, 4) for _ in range(4)]
    real = 3
    y_t_short = torch.tensor(naive_data2vec_target([h[:, :real] for h in teacher], eps))
    y_s_short = naive_data2vec_target([h[:, :real] for h in student], eps)
    expected = sum(
        (y_s_short[0][j][d] - y_t_short[0, j, d].item()) ** 2 for j in range(real) for d in range(4)
    ) / (real * 4)
    y_t_padded = torch.cat([y_t_short, torch.full((1, 2, 4), 7.0)], dim=1)  # garbage on padding
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert L.data2vec_loss(student, y_t_padded, eps=eps, mask=mask).item() == pytest.approx(expected, rel=1e-4)


def test_data2vec_projection_when_sizes_differ():
    student = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    y_t = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="projection"):
        L.data2vec_loss(student, y_t)
    proj = L.Projection(4, 6)
    L.data2vec_loss(student, y_t, projection=proj).backward()
    assert proj.proj.weight.grad is not None and student[0].grad is not None


# ---------------------------------------------------------------- section 4: attention maps


def _naive_attention_per_head(s, t):
    """(1 / (T H)) sum_i sum_h (1/T) sum_j (s - t)^2 per sample, then batch mean."""
    b_n, h_n, t_n, _ = s.shape
    total = 0.0
    for b in range(b_n):
        acc = 0.0
        for i in range(t_n):
            for h in range(h_n):
                acc += sum((s[b, h, i, j].item() - t[b, h, i, j].item()) ** 2 for j in range(t_n)) / t_n
        total += acc / (t_n * h_n)
    return total / b_n


def test_attention_per_head_hand_derived():
    # One head, T = 2: row 0 (1, 0) vs (.5, .5) has MSE (.25 + .25) / 2 = .25; row 1 equal.
    # L = 1 / (T * H) * .25 = .125
    s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    t = torch.full((1, 1, 2, 2), 0.5)
    assert L.attention_mse_per_head(s, t).item() == pytest.approx(0.125)


def test_attention_per_head_naive():
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64).softmax(-1)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64).softmax(-1)
    assert L.attention_mse_per_head(s, t).item() == pytest.approx(_naive_attention_per_head(s, t), rel=1e-12)


def test_attention_per_head_mask_equals_unpadded():
    s = torch.randn(2, 2, 5, 5, dtype=torch.float64).softmax(-1)
    t = torch.randn(2, 2, 5, 5, dtype=torch.float64).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    first = _naive_attention_per_head(s[:1, :, :3, :3], t[:1, :, :3, :3])  # sample 0 without its padding
    expected = (first + _naive_attention_per_head(s[1:], t[1:])) / 2
    assert L.attention_mse_per_head(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-12)


def test_attention_per_head_head_mismatch():
    with pytest.raises(ValueError, match="H_s=2, H_t=3"):
        L.attention_mse_per_head(torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4))


def test_attention_head_mean_naive_and_teacher_forms():
    s = torch.randn(2, 2, 3, 3, dtype=torch.float64).softmax(-1)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64).softmax(-1)  # H_t != H_s is fine here
    expected = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                sbar = sum(s[b, h, i, j].item() for h in range(2)) / 2
                tbar = sum(t[b, h, i, j].item() for h in range(4)) / 4
                expected += (sbar - tbar) ** 2 / (9 * 2)
    per_head_teacher = L.attention_mse_head_mean(s, t).item()
    averaged_teacher = L.attention_mse_head_mean(s, t.mean(dim=1)).item()
    assert per_head_teacher == pytest.approx(expected, rel=1e-12)
    assert averaged_teacher == pytest.approx(expected, rel=1e-12)


def test_attention_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, H, T, T\)"):
        L.attention_mse_per_head(torch.rand(1, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ValueError):
        L.attention_mse_head_mean(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 5, 5))


# ---------------------------------------------------------------- registry


def test_registry_names():
    """The names a job config may use are exactly what the Distiller finds in the registry."""
    for kind, name, fn in [
        ("logits_loss", "kl", L.kd_kl),
        ("logits_loss_topk", "kl", L.kd_kl_topk),
        ("logits_loss", "mse", L.logits_mse),
        ("logits_loss", "soft_ce", L.soft_cross_entropy),
        ("attention_loss", "per_head", L.attention_mse_per_head),
        ("attention_loss", "head_mean", L.attention_mse_head_mean),
    ]:
        assert registry.get(kind, name) is fn
    assert set(registry.names("feature_distance")) == {"mse", "l1", "cosine"}
    assert {"uniform", "last", "explicit", "all-average"} <= set(registry.names("layer_map"))


def test_half_precision_teacher_is_upcast():
    u = torch.randn(2, 5)
    z = torch.randn(2, 5)
    got = L.kd_kl(u, z.half(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(L.kd_kl(u, z.half().float(), 2.0).item(), rel=1e-6)
