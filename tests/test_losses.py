"""medseg's Dice + CE (``medseg.losses.DiceCE``) against MONAI's ``DiceCELoss``: value and gradient."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from medseg.losses import DiceCE

CL = torch.channels_last_3d


def _case(dtype=torch.float32, layout=torch.contiguous_format, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, classes, 9, 7, 5, generator=gen, dtype=torch.float64)).to(dtype)
    label = torch.randint(0, classes, (3, 1, 9, 7, 5), generator=gen)
    label[0][label[0] == 2] = 3  # a class absent from one case (its per-case Dice term is all false positive)
    return logits.contiguous(memory_format=layout), label.float()


def _loss_and_grad(loss_fn, logits, label):
    x = logits.detach().requires_grad_()
    value = loss_fn(x, label)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_value_and_gradient_are_monais(batch, background, layout):
    logits, label = _case(torch.float64, layout)
    ours = DiceCE(batch=batch, include_background=background)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=batch, include_background=background)
    v1, g1 = _loss_and_grad(ours, logits, label)
    v2, g2 = _loss_and_grad(ref, logits, label)
    assert v1.dtype == torch.float64
    assert torch.allclose(v1, v2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-12)
    assert g1.is_contiguous(memory_format=layout)  # the gradient keeps the logits' layout


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_bf16_logits_get_a_bf16_gradient_equal_to_monais_in_fp32(layout):
    logits, label = _case(torch.bfloat16, layout, seed=3)
    ours = DiceCE(batch=True, include_background=False)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)
    v1, g1 = _loss_and_grad(ours, logits, label)
    x = logits.detach().requires_grad_()
    v2 = ref(x.float(), label)  # what the trainer ran before: the loss in fp32 on the bf16 logits
    v2.backward()
    assert v1.dtype == torch.float32
    assert abs(float(v1) - float(v2)) < 1e-5
    assert g1.dtype == torch.bfloat16
    assert g1.is_contiguous(memory_format=layout)
    assert torch.allclose(g1.float(), x.grad.float(), rtol=1e-2, atol=1e-6)


def test_a_label_outside_the_classes_raises_as_monais_does():
    logits, label = _case()
    label[0, 0, 0, 0, 0] = 4
    with pytest.raises(RuntimeError):
        DiceCE()(logits.requires_grad_(), label)


def test_a_single_channel_output_goes_to_monais_own_path():
    """One output channel: MONAI's Dice + binary cross-entropy, not a softmax over one class."""
    logits, label = _case(classes=2)
    one = logits[:, :1].contiguous()
    assert torch.allclose(DiceCE()(one, label), DiceCELoss(to_onehot_y=True, softmax=True)(one, label))
