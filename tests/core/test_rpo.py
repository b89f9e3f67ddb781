"""The robust personalization objective (mrm_ray.core.rpo): known answers and gradients."""

import torch

from mrm_ray.core import rpo


# --- RPO ------------------------------------------------------------------------------
def test_rpo_soft_known_answer():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cfg = rpo.RPOConfig(alpha=0.5, gamma=0.5, detach="none")
    w = torch.sigmoid(torch.tensor([-3.0, -1.0, 1.0, 3.0]))  # (L - tau) / gamma with tau = 2.5
    torch.testing.assert_close(rpo.weights(L, cfg), w)
    torch.testing.assert_close(rpo.objective(L, cfg), (w * L).sum())


def test_rpo_hard_and_off_known_answers():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rpo.objective(L, rpo.RPOConfig(alpha=0.5, gamma=0.0)).item() == 7.0   # top half: 3 + 4
    assert rpo.objective(L, rpo.RPOConfig(alpha=0.25, gamma=-1)).item() == 4.0  # tau = 3.25
    assert rpo.objective(L, rpo.RPOConfig(enabled=False)).item() == 2.5          # plain mean


def test_rpo_gradient_through_weights_and_tau():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.sigmoid((L - 2.5) / 0.5)
    direct = w + w * (1 - w) * L / 0.5                       # d/dL_i of w_i L_i with tau fixed
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="tau"))
    torch.testing.assert_close(c, direct)
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="weights"))
    torch.testing.assert_close(c, w)
    # reference form: tau = (L_2 + L_3) / 2 also carries gradient, shared by the two middle users
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="none"))
    through_tau = -(w * (1 - w) * L / 0.5).sum() / 2
    torch.testing.assert_close(c, direct + torch.tensor([0, through_tau, through_tau, 0]))


def test_rpo_coefficients_reproduce_the_objective_gradient():
    """Distributed form: backprop sum_i c_i L_i == backprop J (any split of the users)."""
    x = torch.randn(9, requires_grad=True)
    L = torch.nn.functional.softplus(x * 3)
    cfg = rpo.RPOConfig(alpha=0.3, gamma=0.2, detach="none")
    (g_direct,) = torch.autograd.grad(rpo.objective(L, cfg), x, retain_graph=True)
    _, c = rpo.coefficients(L.detach(), cfg)
    (g_coef,) = torch.autograd.grad((c * L).sum(), x)
    torch.testing.assert_close(g_direct, g_coef)
