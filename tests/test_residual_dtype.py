"""16-bit gradients and AMP: the residual's dtype (fp32 by default for 16-bit gradients) and the loss
scale of a ``torch.amp.GradScaler`` (the residual holds unscaled values; a step the scaler skips
leaves it as it was). In one process, a world of one; the DDP hook shares the code path
(``DeftState(grad_scaler=...)``, ``deft_kernels.driver.commit``)."""

import pytest
import torch
from torch import nn

from deft_kernels import GradientSparsifier, driver
from deft_kernels.sparsifiers import build


@pytest.mark.parametrize("grad_dtype, residual_dtype, expect", [
    (torch.bfloat16, None, torch.float32), (torch.float16, None, torch.float32),
    (torch.float32, None, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
def test_residual_dtype_defaults_to_fp32_for_16_bit_gradients(grad_dtype, residual_dtype, expect):
    sp = build("topk", 0.1, residual_dtype=residual_dtype)
    out, _ = driver.step(sp, torch.randn(50).to(grad_dtype))
    assert sp.residual.dtype == expect and out.dtype == grad_dtype


def test_residual_dtype_rejects_a_non_float_dtype():
    with pytest.raises(ValueError, match="residual_dtype must be"):
        build("deft", 0.1, residual_dtype=torch.int32)


@pytest.mark.parametrize("residual_dtype, kept", [(None, True), (torch.bfloat16, False)])
def test_small_bf16_gradients_pile_up_in_an_fp32_residual(residual_dtype, kept):
    """Element 1 holds 1.0 in the residual and gets 1e-3 per step, never sent (element 0 always wins
    the one slot): an fp32 residual reaches 1.05 after 50 steps; a bf16 one (8 mantissa bits, a
    step of 2^-7 at 1.0) drops every 1e-3 and stays at 1.0."""
    sp = build("topk", 0.01, residual_dtype=residual_dtype)  # k = 1 of 100
    g = torch.zeros(100)
    g[0], g[1] = 100.0, 1.0
    driver.step(sp, g.bfloat16())
    g[1] = 1e-3
    for _ in range(50):
        driver.step(sp, g.bfloat16())
    expect = 1.0 + 50 * float(torch.tensor(1e-3).bfloat16())
    assert (abs(float(sp.residual[1]) - expect) < 1e-4) == kept, float(sp.residual[1])


def test_grad_scaler_residual_is_unscaled_and_untouched_on_a_skipped_step():
    """fp32 parameters, loss scaled by a CPU GradScaler whose scale doubles after every good step
    (growth_interval=1) and halves on an overflow (an inf planted in one gradient at step 3). Over the
    run: the sum of the unscaled gradients of the good steps == what the optimizer applied + the
    residual left (nothing lost, nothing counted twice, whatever the scale was), and the skipped step
    left the residual exactly as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    gs = GradientSparsifier(model, sparsifier="topk", density=0.2, warmup_steps=0, grad_scaler=scaler)
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: the parameters, hence the gradients, stay put
    given = [torch.zeros_like(p) for p in params]
    applied = [torch.zeros_like(p) for p in params]
    scales, overflow = [], 3
    for t in range(7):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        scale = scaler.get_scale()
        scales.append(scale)
        if t == overflow:
            params[0].grad[0, 0] = float("inf")
            (sp,) = gs.sparsifiers
            before = sp.residual.clone()
        else:
            for acc, p in zip(given, params):
                acc += p.grad / scale
        gs.step()
        if t == overflow:
            assert torch.equal(sp.residual, before)
        scaler.unscale_(opt)
        if t != overflow:
            for acc, p in zip(applied, params):
                acc += p.grad
        scaler.step(opt)
        scaler.update()
    assert scales == [256.0, 512.0, 1024.0, 2048.0, 1024.0, 2048.0, 4096.0], scales  # grows, overflows
    (sp,) = gs.sparsifiers
    total_given = torch.cat([g.flatten() for g in given])
    total_kept = torch.cat([a.flatten() for a in applied]) + sp.residual
    assert float(sp.residual.abs().sum()) > 0
    torch.testing.assert_close(total_kept, total_given, rtol=0, atol=1e-5)


@pytest.mark.parametrize("plan", ["ahead", "leader"])
def test_a_skipped_step_takes_back_the_other_steps_of_its_iteration(plan):
    """Two buckets (or dtype groups) in one iteration with a loss scale; the second one's gradient
    holds an inf, so the scaler skips the optimizer step: neither residual update is committed (the
    first one's output is discarded with the rest). ``driver.commit`` decides for the iteration, in
    one host read of the skip flags that the step one step ahead keeps on the device."""
    sps = [build("deft", 0.1, plan=plan), build("deft", 0.1, plan=plan)]
    for sp in sps:
        driver.run_step(sp, torch.randn(100), loss_scale=4.0)
    before = [sp.residual.clone() for sp in sps]
    bad = torch.randn(100)
    bad[7] = float("inf")
    results = [driver.run_step(sp, g, loss_scale=4.0, commit_now=False) for sp, g in zip(sps, [torch.randn(100), bad])]
    assert all(sp.uncommitted for sp in sps)
    assert all(torch.equal(sp.residual, b) for sp, b in zip(sps, before))  # nothing committed yet
    with pytest.raises(RuntimeError, match="not committed"):
        driver.run_step(sps[0], torch.randn(100), loss_scale=4.0)
    assert driver.commit(list(zip(sps, results)))
    assert [r.skipped for r in results] == [False, True]
    assert all(torch.equal(sp.residual, b) for sp, b in zip(sps, before))
    assert not bool(torch.isfinite(results[1].out).all())
    good = [driver.run_step(sp, torch.randn(100), loss_scale=4.0, commit_now=False) for sp in sps]
    assert not driver.commit(list(zip(sps, good)))  # none skipped: both committed
    assert all(not torch.equal(sp.residual, b) for sp, b in zip(sps, before))


def test_grad_scaler_argument_is_checked():
    with pytest.raises(TypeError, match="grad_scaler must be None or a torch.amp.GradScaler"):
        GradientSparsifier(nn.Linear(2, 2), grad_scaler=2.0)


def test_an_inf_that_is_not_sent_still_skips_the_step_on_every_rank():
    """CLT-k at step 1: rank 1 leads and sends its own top k; rank 0's inf lies where rank 1's
    gradient is 0, so it is not sent and the averaged values are finite. The step must still be
    skipped on both ranks (residuals as they were, an inf in the output so that the scaler skips),
    or the inf would stay in rank 0's residual while the optimizer applied the step."""
    from deft_kernels.driver import run_lockstep, step_program

    sps = [build("cltk", 0.05), build("cltk", 0.05)]
    gen = torch.Generator().manual_seed(0)
    first = run_lockstep([step_program(sp, torch.randn(100, generator=gen), rank=r, world_size=2, loss_scale=8.0)
                          for r, sp in enumerate(sps)])
    for sp, result in zip(sps, first):
        driver.commit([(sp, result)])
    before = [sp.residual.clone() for sp in sps]
    grads = [torch.randn(100, generator=gen) for _ in range(2)]
    grads[1][7] = 0.0
    before[1][7] = 0.0
    sps[1].residual[7] = 0.0
    grads[0][7] = float("inf")
    results = run_lockstep([step_program(sp, g, rank=r, world_size=2, loss_scale=8.0)
                            for r, (sp, g) in enumerate(zip(sps, grads))])
    for sp, result in zip(sps, results):
        driver.commit([(sp, result)])  # each rank commits its own iteration
    assert 7 not in results[0].sent.tolist()
    assert all(r.skipped for r in results)
    assert all(torch.equal(sp.residual, b) for sp, b in zip(sps, before))
    assert all(not bool(torch.isfinite(r.out).all()) for r in results)


@pytest.mark.parametrize("plan", ["ahead", "leader"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_fp32_residual_of_16_bit_gradients_is_updated_in_place(grad_dtype, plan):
    """4 bytes per element kept between steps, not 8: a 16-bit gradient is added into the fp32
    residual in place (before, through an fp32 work buffer as large as the residual); only a loss
    scale needs that buffer."""
    sp = build("deft", 0.1, plan=plan)
    for _ in range(3):
        driver.step(sp, torch.randn(1000).to(grad_dtype))
    assert sp.residual.dtype == torch.float32 and sp.spare is None
    driver.run_step(sp, torch.randn(1000).to(grad_dtype), loss_scale=2.0)
    assert sp.spare is not None and sp.spare.dtype == torch.float32
