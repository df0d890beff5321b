"""`functional.loha.HadaWeight` (the flat LoHa ΔW with recomputing backward, scaling folded into the rank-r
factors, in-place Hadamard products): float64 gradcheck and equality with the plain formula."""

from __future__ import annotations

import pytest
import torch

from loha_diffusion.functional.loha import HadaWeight, delta_weight_reference


@pytest.mark.parametrize("scaling", [1.0, 0.37, -2.5])
def test_gradcheck_float64(scaling):
    torch.manual_seed(0)
    shapes = [(7, 3), (3, 11), (7, 3), (3, 11)]
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(lambda *f: HadaWeight.apply(*f, scaling), factors)


def test_equals_the_plain_formula_and_leaves_the_factors_alone():
    torch.manual_seed(1)
    shapes = [(20, 4), (4, 12), (20, 4), (4, 12)]
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    copies = [f.detach().clone() for f in factors]
    got = HadaWeight.apply(*factors, 0.5)
    reference = [f.detach().clone().requires_grad_() for f in factors]
    expected = delta_weight_reference(*reference, scaling=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad)
    for f, r, c in zip(factors, reference, copies):
        torch.testing.assert_close(f.grad, r.grad, rtol=1e-12, atol=1e-12)
        assert torch.equal(f.detach(), c)  # the in-place products never touch a factor
