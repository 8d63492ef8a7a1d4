"""The end-to-end stage's gradient, accumulated one item at a time, is the full batch's."""

from __future__ import annotations

import torch

from gsq_vllm.gsq.end_to_end import _accumulate_kl_gradients, kl_divergence


def test_item_by_item_gradient_equals_the_batch_gradient():
    torch.manual_seed(0)
    inputs = [torch.randn(length, 8, dtype=torch.float64) for length in (5, 9, 3)]  # items of unequal length
    teacher_weight = torch.randn(8, 11, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.ones(11, dtype=torch.float64))
    noisy = teacher_weight + 0.3 * torch.randn_like(teacher_weight)

    def student(items):
        return torch.log_softmax(torch.cat([inputs[i] for i in items]) @ noisy * scale, dim=-1)

    def teacher(items):
        return torch.log_softmax(torch.cat([inputs[i] for i in items]) @ teacher_weight, dim=-1)

    items = [2, 0, 1]
    batch_loss = kl_divergence(teacher(items), student(items))
    (expected,) = torch.autograd.grad(batch_loss, [scale])
    loss = _accumulate_kl_gradients(student, teacher, items, [scale])
    assert abs(loss - batch_loss.item()) < 1e-6 * batch_loss.item()  # kl_divergence sums in fp32
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-8)
