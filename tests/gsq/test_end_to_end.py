"""The end-to-end stage's gradient, accumulated one item and one chunk of positions at a time, is the
full batch's."""

from __future__ import annotations

import pytest
import torch

from gsq_vllm.gsq.end_to_end import EndToEndConfig, _accumulate_kl_gradients, kl_divergence, tune_end_to_end


def _problem():
    torch.manual_seed(0)
    inputs = [torch.randn(length, 8, dtype=torch.float64) for length in (5, 9, 3)]  # items of unequal length
    head_weight = torch.randn(11, 6, dtype=torch.float64)
    teacher_weight = torch.randn(8, 6, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    noisy = teacher_weight + 0.3 * torch.randn_like(teacher_weight)

    def student(items):  # final hidden states: the head turns them into logits
        return torch.cat([inputs[i] for i in items]) @ noisy * scale

    def teacher(items):
        return torch.cat([inputs[i] for i in items]) @ teacher_weight

    def head(hidden):
        return hidden @ head_weight.T

    return student, teacher, head, scale


def _tuned(**options):
    """The problem tuned on its first two items (the third held out): (result, scale, problem)."""
    student, teacher, head, scale = _problem()
    config = EndToEndConfig(items_per_step=2, holdout=0.34, **options)
    result = tune_end_to_end(student, teacher, [scale], 3, config, head=head, progress=False)
    return result, scale.detach().clone(), (student, teacher, head)


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_item_by_item_chunked_gradient_equals_the_batch_gradient(chunk):
    student, teacher, head, scale = _problem()
    items = [2, 0, 1]
    batch_loss = kl_divergence(torch.log_softmax(head(teacher(items)), -1), torch.log_softmax(head(student(items)), -1))
    (expected,) = torch.autograd.grad(batch_loss, [scale])
    loss = _accumulate_kl_gradients(student, teacher, items, [scale], head, chunk=chunk)
    assert abs(loss - batch_loss.item()) < 1e-6 * batch_loss.item()  # kl_divergence sums in fp32
    torch.testing.assert_close(scale.grad, expected, rtol=1e-5, atol=1e-8)


def test_chunk_size_changes_only_rounding():
    results = []
    for chunk in (2, 64):
        result, scale, _ = _tuned(steps=5, lr=1e-2, positions_per_chunk=chunk)
        results.append((result.initial_kl, result.final_kl, scale))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-7)
    assert results[0][1] < results[0][0]  # it learnt something


def _held_out_kl(student, teacher, head, item: int) -> float:
    with torch.no_grad():
        return kl_divergence(torch.log_softmax(head(teacher([item])), -1), torch.log_softmax(head(student([item])), -1)).item()


def test_checking_the_held_out_kl_does_not_change_the_steps():
    (plain, plain_scale, _), (checked, checked_scale, _) = (_tuned(steps=6, lr=1e-2, keep_best_every=every)
                                                             for every in (0, 1))
    assert plain.held_out.keys() == {0, 6} and checked.held_out.keys() == set(range(7))
    assert checked.history == plain.history  # the same training losses, step for step
    assert checked.best_step == 6  # on this problem the end is the best: the same parameters
    torch.testing.assert_close(checked_scale, plain_scale, rtol=0, atol=0)


def test_the_best_checked_step_is_kept_when_training_overshoots():
    result, _, (student, teacher, head) = _tuned(steps=12, lr=0.02, keep_best_every=1)  # best: step 4
    best_step = min(result.held_out, key=result.held_out.get)
    assert 0 < best_step < 12, f"this problem no longer overshoots: {result.held_out}"  # the test's premise
    assert result.best_step == best_step and not result.kept_initial
    assert result.final_kl == pytest.approx(min(result.held_out.values()))
    assert _held_out_kl(student, teacher, head, 2) == pytest.approx(result.final_kl, rel=1e-5)  # what it returned
