"""The fine-tuning objective (mrm_ray.core.finetune) against plain per-pair arithmetic."""
from __future__ import annotations

import math

import torch

from mrm_ray.core.finetune import MetaHead, UserFactors, pair_losses
from reference_loops import meta_margins_loop


def _loop_margins(f: UserFactors, chosen, rejected, user) -> list[float]:
    out = []
    for c, r, u in zip(chosen, rejected, user.tolist()):
        w = f.users[u] + (f.shared if f.shared is not None else 0)
        out.append(sum(float(w[k]) * float(f.proj[k] @ (c - r)) for k in range(f.proj.shape[0])))
    return out


def test_margins_equal_a_loop_over_pairs_with_and_without_shared_weights():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    user = torch.tensor([0, 2, 1, 2, 0, 0, 1])
    for shared in (False, True):
        f = UserFactors(dim=5, n_users=3, rank=4, seed=1, shared=shared)
        got = f.margins(chosen, rejected, user).tolist()
        want = _loop_margins(f, chosen, rejected, user)
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want))


def test_shared_weights_leave_the_seeded_start_of_the_rest_unchanged():
    a, b = UserFactors(5, 3, 4, seed=2), UserFactors(5, 3, 4, seed=2, shared=True)
    assert torch.equal(a.proj, b.proj) and torch.equal(a.users, b.users)
    assert a.shared is None and b.shared.shape == (4,)
    assert len(list(b.parameters())) == len(list(a.parameters())) + 1


def test_the_shared_weights_learn_from_every_users_pairs():
    """One gradient step: the shared vector's gradient is the sum of what each user's own vector gets."""
    g = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    user = torch.tensor([0, 1, 2, 0, 1, 2])
    f = UserFactors(5, 3, 4, seed=0, shared=True)
    pair_losses(f.margins(chosen, rejected, user)).sum().backward()
    torch.testing.assert_close(f.shared.grad, f.users.grad.sum(0))


def test_pair_loss_is_minus_log_sigmoid():
    m = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(pair_losses(m), -torch.log(torch.sigmoid(m)))


def test_meta_head_adapts_each_user_like_a_plain_autograd_loop():
    g = torch.Generator().manual_seed(4)
    chosen, rejected = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    user = torch.tensor([7, 3, 7, 3, 9, 7, 3, 9, 5])          # any ids; user 5 has no support pair
    support = torch.tensor([True, True, False, False, True, True, True, False, False])
    head = MetaHead(dim=6, rank=3, seed=2, lr=0.7, steps=3)
    got = head.margins(chosen, rejected, user, support).tolist()
    want = meta_margins_loop(head, chosen, rejected, user.tolist(), support.tolist())
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want)), (got, want)
    # user 5 kept the shared start: its margin is w0 . d
    d = (chosen[8] - rejected[8]) @ head.proj.T
    assert math.isclose(got[8], float(head.init @ d), rel_tol=1e-6)


def test_meta_query_loss_reaches_the_features_through_the_adaptation():
    """The query loss trains the features of support pairs too (they moved w_u), and the step size."""
    g = torch.Generator().manual_seed(5)
    chosen = torch.randn(4, 6, generator=g, requires_grad=True)
    rejected = torch.randn(4, 6, generator=g)
    user, support = torch.tensor([0, 0, 1, 1]), torch.tensor([True, False, True, False])
    head = MetaHead(6, 3, seed=0)
    m = head.margins(chosen, rejected, user, support)
    pair_losses(m[~support]).sum().backward()
    assert chosen.grad[support].abs().sum() > 0 and head.log_lr.grad.abs() > 0


def test_meta_start_margins_are_w0_on_the_projected_difference():
    g = torch.Generator().manual_seed(6)
    chosen, rejected = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    head = MetaHead(6, 3, seed=1)
    want = [float(head.init @ (head.proj @ (chosen[i] - rejected[i]))) for i in range(5)]
    got = head.start_margins(chosen, rejected).tolist()
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want)), (got, want)
