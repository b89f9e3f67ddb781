"""The data-driven start (mrm_ray.core.basis) and Newton adaptation: known answers and reference loops."""
import pytest
import torch
import torch.nn.functional as F

from mrm_ray import zoo
from mrm_ray.core import basis
from mrm_ray.core.adapt import InnerConfig, adapt, newton, posterior_objective


@pytest.fixture(autouse=True)
def _float64_one_thread():
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # thousands of tiny ops: a second thread only adds waiting
    yield
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(threads)


def ragged(n_users=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 12, (n_users,), generator=g)
    counts[2] = 0                                   # a user without pairs keeps theta_0
    seg = torch.repeat_interleave(torch.arange(n_users), counts)
    return torch.randn(len(seg), k, generator=g) * 2, seg


def mode_one_user(mu, prec, dphi):
    """One user's posterior mode by L-BFGS on the same objective: the reference."""
    theta = mu.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(dphi @ theta)).sum() + 0.5 * ((theta - mu) ** 2 * prec).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def test_newton_reaches_each_users_posterior_mode():
    dphi, seg = ragged()
    mu, prec = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.5, 2.0, 1.0])
    theta = newton(mu, prec, dphi, seg, 6, steps=20, differentiable=False)
    for u in range(6):
        ref = mode_one_user(mu, prec, dphi[seg == u])
        torch.testing.assert_close(theta[u], ref, atol=1e-7, rtol=0)
    torch.testing.assert_close(theta[2], mu)        # no pairs: the prior mean


def test_newton_objective_never_rises():
    dphi, seg = ragged(seed=3)
    dphi = dphi * 5                                  # large margins: plain Newton would overshoot
    mu, prec = torch.zeros(3), torch.full((3,), 1e-3)
    before = posterior_objective(mu.expand(6, 3), mu, prec, dphi, seg)
    for steps in range(1, 6):
        after = posterior_objective(newton(mu, prec, dphi, seg, 6, steps, differentiable=False), mu, prec, dphi, seg)
        assert bool((after <= before + 1e-12).all())
        before = after


def test_newton_is_differentiable_like_a_per_user_loop():
    """Gradients through batched Newton == through one user at a time (same steps, same step sizes)."""
    dphi, seg = ragged(seed=1)
    mu = torch.tensor([0.5, 0.1, 0.0], requires_grad=True)
    log_prec = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    w = dphi.clone().requires_grad_(True)
    batched = newton(mu, log_prec.exp(), w, seg, 6, steps=3)
    (batched ** 2).sum().backward()
    grads = [mu.grad.clone(), log_prec.grad.clone(), w.grad.clone()]
    for t in (mu, log_prec, w):
        t.grad = None
    total = 0
    for u in range(6):
        rows = seg == u
        total = total + (newton(mu, log_prec.exp(), w[rows], torch.zeros(int(rows.sum()), dtype=torch.long), 1,
                                steps=3) ** 2).sum()
    total.backward()
    for a, b in zip(grads, (mu.grad, log_prec.grad, w.grad)):
        torch.testing.assert_close(a, b)


def test_adapt_newton_needs_linear_weights_and_a_prior():
    dphi, seg = ragged()
    cfg = InnerConfig(optimizer="newton", steps=3)
    with pytest.raises(ValueError, match="linear"):
        adapt(torch.zeros(3), dphi, seg, 6, cfg, prior=torch.ones(3), weights="softmax")
    theta = adapt(torch.zeros(3), dphi, seg, 6, cfg, prior=torch.ones(3), weights="linear")
    torch.testing.assert_close(theta, newton(torch.zeros(3), torch.ones(3), dphi, seg, 6, 3))


def test_ridge_bt_is_stationary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    x = x * torch.sign(x @ torch.randn(10, generator=g) + 0.3 * torch.randn(400, generator=g)).unsqueeze(1)
    v = basis.ridge_bt(x, ridge=0.1).requires_grad_(True)
    loss = F.softplus(-(x @ v)).mean() + 0.1 / 10 * v.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, v)
    assert float(grad.abs().max()) < 1e-7


def test_global_scale_is_the_one_dimensional_mle():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, generator=g)
    labels = torch.rand(500, generator=g) < torch.sigmoid(2.5 * m)
    m = torch.where(labels, m, -m)                   # oriented chosen - rejected
    a = basis.global_scale(m)
    grid = torch.linspace(0.5, 6, 20001)
    ll = -F.softplus(-grid.unsqueeze(1) * m).sum(1)
    assert abs(float(a) - float(grid[ll.argmax()])) < 1e-3
    assert 1.8 < float(a) < 3.3                       # and near the truth


def test_directions_find_the_axis_users_disagree_on():
    """Users w_u = v + a_u b with many pairs each: the top direction is b (covariance metric)."""
    g = torch.Generator().manual_seed(0)
    d, n_users, per = 16, 200, 40
    v, b = torch.zeros(d), torch.zeros(d)
    v[0], b[1] = 2.0, 1.5
    a = torch.randn(n_users, generator=g)
    seg = torch.arange(n_users).repeat_interleave(per)
    x = torch.randn(len(seg), d, generator=g)
    w = v + a[seg].unsqueeze(1) * b
    y = torch.rand(len(seg), generator=g) < torch.sigmoid((x * w).sum(1))
    x = torch.where(y.unsqueeze(1), x, -x)
    v0 = basis.ridge_bt(x, 1e-3)
    dirs = basis.directions(x, seg, n_users, v0, basis.whitener(x, 0.05), 2)
    first = dirs[0] / dirs[0].norm()
    assert abs(float(first[1])) > 0.95


def test_fit_prior_recovers_the_population_variance():
    g = torch.Generator().manual_seed(1)
    n_users, per = 300, 60
    mu_true, sd_true = torch.tensor([1.5, 0.0]), torch.tensor([0.3, 0.8])
    theta = mu_true + sd_true * torch.randn(n_users, 2, generator=g)
    seg = torch.arange(n_users).repeat_interleave(per)
    x = torch.randn(len(seg), 2, generator=g)
    y = torch.rand(len(seg), generator=g) < torch.sigmoid((x * theta[seg]).sum(1))
    x = torch.where(y.unsqueeze(1), x, -x)
    mu, prec = basis.fit_prior(torch.eye(2), x, seg, n_users, basis.BasisConfig(em_iters=30))
    torch.testing.assert_close(mu, mu_true, atol=0.1, rtol=0)
    torch.testing.assert_close(prec.rsqrt(), sd_true, atol=0.1, rtol=0)


def _zoo_inputs(name: str, **changes):
    g = zoo.generate(zoo.variant(name, **changes))
    train = ~g.is_test
    x = torch.from_numpy((g.chosen - g.rejected)[train]).double()
    x = x / x.pow(2).sum(1).mean().sqrt()
    seg = torch.from_numpy(g.user[train])
    fold = torch.arange(g.spec.users) % 5
    conv = torch.from_numpy(g.conv[train])
    half = (conv * 2654435761 % 97) % 2 == 0          # a fixed half of each user's conversations
    return g, x, seg, fold, half


def test_fit_finds_the_true_span_of_a_low_rank_population():
    g, x, seg, fold, half = _zoo_inputs("lowrank", users=500, dim=24, noisy=0.0, pairs=(20, 40))
    found = basis.fit(x, seg, g.spec.users, fold, half, basis.BasisConfig(max_heads=5))
    assert found.personalize and found.weight.shape[0] == 3       # shared + the 2 true directions
    # principal angles between span(W) and the true span, in the covariance metric of x
    chol = basis.whitener(x, 0.0)
    qa = torch.linalg.qr((found.weight @ chol).T).Q
    qb = torch.linalg.qr((torch.from_numpy(g.span) @ chol).T).Q
    assert float(torch.linalg.svdvals(qa.T @ qb).min()) > 0.9


def test_fit_does_not_personalize_a_population_without_user_differences():
    g, x, seg, fold, half = _zoo_inputs("homogeneous", users=500, dim=24, noisy=0.0)
    found = basis.fit(x, seg, g.spec.users, fold, half, basis.BasisConfig(max_heads=4))
    assert not found.personalize or found.weight.shape[0] == 1
