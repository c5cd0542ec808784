"""FusedAdam / FusedAdamW on every backend: parity with torch.optim.Adam/AdamW (foreach=False) and with the
float64 reference (fusedops.reference.adam_step), state_dict round trips with torch, GradScaler, argument
checks, 16-bit params (master weights, stochastic rounding), bf16 moments.

Inputs are random (never zeros), tensors have odd sizes (1, 7, 1000, 4097 = a SIMD batch multiple + 1,
empty, 2-D), and every element of every tensor is compared. Emulated runs stay small.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedops
from fusedops import reference
from fusedops.optim import FusedAdam, FusedAdamW

from conftest import backend_params

SIZES = [(1,), (7,), (1000,), (4097,), (0,), (3, 5)]
STEPS = 100


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are small: on a shared 2-core machine, waking a second thread for each of torch's
    reference ops costs more than the op. test_threads_agree covers the kernels' multi-threaded split."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_params(sizes, device, dtype=torch.float32, low=None):
    out = []
    for s in sizes:
        x = torch.randn(s) if low is None else torch.empty(s).uniform_(low, 2 * low)
        out.append(x.to(dtype).to(device).requires_grad_())
    return out


def clones(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def random_grad(p, scale):
    return (torch.randn(p.shape, device=p.device) * scale).to(p.dtype)


def state_of(opt, p):
    return opt.state[p] if p in opt.state else {}


# ---- parity with torch.optim.Adam / AdamW, fp32, every flag combination -----------------------------------

@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr", "lrT"])
@pytest.mark.parametrize("capturable", [False, True], ids=["", "capt"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "max"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "ams"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_matches_torch(backend, device, decoupled, weight_decay, amsgrad, maximize, capturable, lr_tensor):
    """100 steps of two param groups (different lr and betas; lr changed every step), one param that never
    has a gradient, one that has it every other step (so per-param step counts differ)."""
    init = make_params(SIZES, device)
    frozen = torch.randn(5, device=device)
    ours_p, torch_p = clones(init), clones(init)
    ours_frozen, torch_frozen = frozen.clone().requires_grad_(), frozen.clone().requires_grad_()
    lr0 = 0.02

    def groups(params, frozen_param):
        lrs = [torch.tensor(lr0), torch.tensor(lr0 / 2)] if lr_tensor else [lr0, lr0 / 2]
        return [{"params": [frozen_param] + params[:3], "lr": lrs[0]},
                {"params": params[3:], "lr": lrs[1], "betas": (0.3, 0.9)}]

    hyper = dict(eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    cls = FusedAdamW if decoupled else FusedAdam
    ours = cls(groups(ours_p, ours_frozen), capturable=capturable, **hyper)
    ref = torch.optim.Adam(groups(torch_p, torch_frozen), foreach=False, decoupled_weight_decay=decoupled, **hyper)
    # The float64 reference, param by param.
    ref64 = [p.detach().double().cpu() for p in init]
    states64 = [reference.adam_new_state(p, amsgrad) for p in ref64]
    group_of = [0, 0, 0, 1, 1, 1]
    scales = [1.0, 0.01, 3.0, 0.3, 1.0, 10.0]

    for t in range(STEPS):
        lr_now = [lr0 * (1 - t / (2 * STEPS)), lr0 / 2 * (1 - t / (2 * STEPS))]
        for opt in (ours, ref):
            for group, value in zip(opt.param_groups, lr_now):
                if lr_tensor:
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value
        for i, (a, b) in enumerate(zip(ours_p, torch_p)):
            if i == 1 and t % 2 == 1:
                a.grad = b.grad = None
                continue
            g = random_grad(a, scales[i])
            a.grad, b.grad = g.clone(), g.clone()
            betas = (0.9, 0.999) if group_of[i] == 0 else (0.3, 0.9)  # β1 < 0.5: torch's other lerp form
            # The reference sees the learning rate the optimizers hold (a float32 value for a tensor lr).
            lr_i = float(torch.tensor(lr_now[group_of[i]])) if lr_tensor else lr_now[group_of[i]]
            ref64[i] = reference.adam_step(ref64[i], g.double().cpu(), states64[i], lr=lr_i, beta1=betas[0],
                                           beta2=betas[1], eps=1e-8, weight_decay=weight_decay,
                                           decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
        ours.step()
        ref.step()

    assert torch.equal(ours_frozen, frozen) and len(state_of(ours, ours_frozen)) == 0
    for i, (a, b, p0) in enumerate(zip(ours_p, torch_p, init)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"param {i} vs torch")
        torch.testing.assert_close(a.detach().double().cpu(), ref64[i], rtol=1e-5, atol=1e-5, msg=f"param {i} vs float64")
        if a.numel():
            assert (a != p0).all(), f"param {i}: some elements were never updated"
        sa, sb = ours.state[a], ref.state[b]
        assert float(sa["step"]) == float(sb["step"]) == states64[i]["step"]
        assert sa["step"].dtype == torch.float32 and sa["step"].device == a.device
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        for k in keys:
            torch.testing.assert_close(sa[k], sb[k], rtol=2e-5, atol=1e-7, msg=f"{k} of param {i} vs torch")
            torch.testing.assert_close(sa[k].double().cpu(), states64[i][k], rtol=1e-4, atol=1e-7,
                                       msg=f"{k} of param {i} vs float64")
        assert set(sa) == set(sb)


def test_defaults_match_torch():
    p = [torch.zeros(1, requires_grad=True)]
    for ours, theirs in ((FusedAdam(p), torch.optim.Adam(p)), (FusedAdamW(p), torch.optim.AdamW(p))):
        for key, value in theirs.defaults.items():
            assert ours.defaults[key] == value, key


def test_closure_and_return_value(backend, device):
    p = make_params([(33,)], device)[0]
    target = torch.randn(33, device=device)
    opt = FusedAdam([p], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(30):
        last = opt.step(closure)
    assert calls == [True] * 31
    assert float(last.detach()) < float(first.detach()) / 4


# ---- 16-bit params: rounding to nearest, master weights ------------------------------------------------------

def reference_run(init, grads, steps, *, dtype, mode, **hyper):
    """float64 trajectories of `init` under the per-step gradients grads[t][i]; mode "nearest" rounds the
    param to `dtype` after each step, "master"/"exact" keep it exact."""
    params = [p.detach().double().cpu() for p in init]
    states = [reference.adam_new_state(p, hyper["amsgrad"]) for p in params]
    for t in range(steps):
        for i in range(len(params)):
            params[i] = reference.adam_step(params[i], grads[t][i].double().cpu(), states[i], **hyper)
            if mode == "nearest":
                params[i] = reference.round_to(params[i], dtype)
    return params, states


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-14))) - mantissa)


@pytest.mark.parametrize("mode", ["nearest", "master"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16bit_params(backend, device, dtype, mode):
    """Moments stay float32; the param is rounded to nearest after each step, or (master) is the rounding of
    an fp32 master copy that follows the float64 trajectory as closely as an fp32 param would."""
    sizes = [(1,), (7,), (1000,), (4097,), (0,)]
    init = make_params(sizes, device, dtype)
    params = clones(init)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, decoupled_weight_decay=True,
                 amsgrad=True, maximize=False)
    opt = FusedAdamW(params, lr=hyper["lr"], weight_decay=0.05, amsgrad=True, master_weights=mode == "master")
    steps = 40
    grads = [[random_grad(p, 1.0) for p in params] for _ in range(steps)]
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
    expected, states = reference_run(init, grads, steps, dtype=dtype, mode=mode, **hyper)
    for i, (p, e, p0) in enumerate(zip(params, expected, init)):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"].double().cpu(), states[i]["exp_avg"], rtol=1e-4, atol=1e-6)
        got = p.detach().double().cpu()
        if mode == "master":
            master = state["master_param"]
            assert master.dtype == torch.float32
            torch.testing.assert_close(master.double().cpu(), e, rtol=1e-5, atol=1e-5)
            assert torch.equal(p.detach(), master.to(dtype)), "the param must be its master copy rounded to nearest"
        else:
            # Where the fp32 and float64 updates straddle a rounding boundary the two trajectories part by
            # an ulp (of the magnitude at that step, which the path bounds: a step moves a param by about
            # lr); they cannot drift further apart (the gradients do not depend on the param).
            largest = torch.maximum(e.abs(), p0.detach().double().cpu().abs()) + steps * hyper["lr"]
            assert ((got - e).abs() <= 2 * ulp(largest, dtype)).all(), f"param {i}: more than 2 ulps from float64"
            assert (got == e).float().mean() > 0.8 if p.numel() > 100 else True
        if p.numel():
            moved = (state["master_param"] if mode == "master" else p).detach() != p0.detach()
            # Rounding to nearest keeps an element whose updates stay under half an ulp (and can bring one
            # back to where it started); a master copy moves on every step.
            assert moved.all() if mode == "master" else (p.numel() < 1000 or moved.float().mean() > 0.8)


# ---- stochastic rounding ------------------------------------------------------------------------------------

def _sr_setup(device, seed, state_dtype=torch.float32, stochastic=True, sizes=((20000,),), steps=60):
    """bf16 params in [1, 2) (ulp 2^-7) moved by updates of about 0.1 ulp per step: rounding to nearest
    loses every one of them, stochastic rounding keeps them on average."""
    torch.manual_seed(1234)
    init = make_params(list(sizes), device, torch.bfloat16, low=1.0)
    grads = [[(torch.rand(p.shape, device=device) + 0.5).to(torch.bfloat16) for p in init] for _ in range(steps)]
    params = clones(init)
    lr = 0.1 * 2.0**-7
    opt = FusedAdam(params, lr=lr, stochastic_rounding=stochastic, state_dtype=state_dtype, seed=seed)
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        opt.step()
    hyper = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=False, maximize=False)
    return params, init, grads, hyper, opt


def test_stochastic_rounding_is_unbiased(backend, device):
    steps = 60
    params, init, grads, hyper, _ = _sr_setup(device, seed=7, steps=steps)
    exact, _ = reference_run(init, grads, steps, dtype=torch.bfloat16, mode="exact", **hyper)
    err = (params[0].detach().double().cpu() - exact[0]) / 2.0**-7  # in ulps (all values stay in [1, 2))
    moved = (init[0].double().cpu() - exact[0]) / 2.0**-7
    assert moved.mean() > 5, "the test needs updates that add up to several ulps"
    # Each step adds an independent zero-mean rounding error of at most 1 ulp: the mean over 20000
    # elements is ~0 (its standard deviation is below 0.03 ulp); rounding to nearest would be off by `moved`.
    assert abs(err.mean()) < 0.1, f"mean error {err.mean():.3f} ulp: stochastic rounding is biased"
    assert err.std() < 0.6 * math.sqrt(steps) and err.abs().max() < 6 * math.sqrt(steps)

    nearest, _, _, _, _ = _sr_setup(device, seed=7, stochastic=False, steps=steps)
    assert torch.equal(nearest[0], init[0]), "rounding to nearest loses updates below half an ulp (test premise)"


def test_stochastic_rounding_is_deterministic(backend, device):
    a = _sr_setup(device, seed=3, state_dtype=torch.bfloat16, sizes=((1,), (4097,)), steps=5)
    b = _sr_setup(device, seed=3, state_dtype=torch.bfloat16, sizes=((1,), (4097,)), steps=5)
    c = _sr_setup(device, seed=4, state_dtype=torch.bfloat16, sizes=((1,), (4097,)), steps=5)
    for pa, pb, pc in zip(a[0], b[0], c[0]):
        assert torch.equal(pa, pb)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[4].state[pa][k], b[4].state[pb][k])
    assert not torch.equal(a[0][1], c[0][1]), "another seed must draw other roundings"


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpu_isas_agree_with_emulator_bit_for_bit(isa):
    """The CPU kernel of each ISA (vectorized Philox, vector fma/sqrt/div, scalar tail) and the CUDA kernel on
    the emulator execute the same roundings and draw the same random bits."""
    available = fusedops.build_info()["cpu_isas_available"]
    if isa not in available:
        pytest.skip(f"{isa} does not run here")
    sizes = [(1,), (7,), (100,), (4097,), (0,), (65, 3)]
    init = make_params(sizes, "cpu", torch.bfloat16)
    grads = [[random_grad(p, 1.0) for p in init] for _ in range(4)]
    results = []
    for backend, cpu_isa in (("cuda-emulated", None), ("cpu", isa)):
        previous = fusedops._C.cpu_isa()
        if cpu_isa:
            fusedops.set_cpu_isa(cpu_isa)
        try:
            params = clones(init)
            opt = FusedAdamW(params, lr=3e-3, amsgrad=True, weight_decay=0.1, stochastic_rounding=True,
                             state_dtype=torch.bfloat16, seed=99)
            with fusedops.backend(backend):
                for g in grads:
                    for p, gi in zip(params, g):
                        p.grad = gi.clone()
                    opt.step()
            results.append((params, opt))
        finally:
            fusedops.set_cpu_isa(previous)
    (pe, oe), (pc, oc) = results
    for a, b in zip(pe, pc):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(oe.state[a][k].view(torch.int16), oc.state[b][k].view(torch.int16)), k


def test_stochastic_rounding_bits_match_reference(backend, device):
    """One step from zero moments, where the fp32 values before rounding are computable exactly in Python:
    the stored bf16 moments and params are those values rounded with the documented Philox bits."""
    seed, lr = 0xC0FFEE123, 1e-3
    sizes = [(5,), (1,), (7,), (1000,), (4097,)]
    params = make_params(sizes, device, torch.bfloat16)
    init = clones(params)
    params[0].grad = None  # no gradient: its position still counts in the random streams
    grads = [None] + [random_grad(p, 1.0) for p in params[1:]]
    for p, g in zip(params[1:], grads[1:]):
        p.grad = g.clone()
    # Two groups: a tensor's stream id is its position in the whole parameter list.
    opt = FusedAdam([{"params": params[:2]}, {"params": params[2:]}], lr=lr, eps=0.0, amsgrad=True,
                    stochastic_rounding=True, state_dtype=torch.bfloat16, seed=seed)
    opt.step()
    f32 = torch.float32
    w = torch.tensor(1 - 0.9, dtype=f32)
    c2 = torch.tensor(1 - 0.999, dtype=f32)
    inv_bias2 = torch.tensor(1 / math.sqrt(1 - 0.999), dtype=f32)
    neg_step = torch.tensor(-lr / (1 - 0.9), dtype=f32)
    for rng_id in range(1, len(params)):
        p, g = params[rng_id], grads[rng_id].float().cpu()
        n = p.numel()
        m = w * g  # fma(w, g - 0, 0)
        v = (c2 * g) * g  # fma(c2·g, g, β2·0)
        denom = v.sqrt() * inv_bias2  # fma(√v, 1/√bias2, eps = 0)
        # fma(-step, m / denom, p): the product of two floats is exact in float64.
        new_p = (neg_step.double() * (m / denom).double() + init[rng_id].detach().double().cpu()).float()
        bits = reference.adam_random_bits(seed, rng_id, 1, n)
        st = opt.state[p]
        # One draw per element rounds all of its stochastically stored values.
        expect = {k: reference.bf16_stochastic_round(x, bits)
                  for k, x in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", v))}
        for k, e in expect.items():
            assert torch.equal(st[k].cpu().view(torch.int16), e.view(torch.int16)), f"{k} of tensor {rng_id}"
        expect_p = reference.bf16_stochastic_round(new_p, bits)
        assert torch.equal(p.detach().cpu().view(torch.int16), expect_p.view(torch.int16)), f"param {rng_id}"
        # Not merely rounding to nearest: some elements must round the other way.
        if n >= 1000:
            assert not torch.equal(st["exp_avg"].cpu(), m.to(torch.bfloat16))


@pytest.mark.parametrize("options", [{}, dict(stochastic_rounding=True, state_dtype=torch.bfloat16)],
                         ids=["nearest", "stochastic"])
def test_nan_gradient_propagates(backend, device, options):
    """A NaN gradient element makes that param and its moments NaN (as in torch), never a finite value or
    an inf; the other elements are unaffected."""
    p = make_params([(4097,)], device, torch.bfloat16)[0]
    g = random_grad(p, 1.0)
    g[5] = float("nan")
    g[4096] = float("nan")
    p.grad = g
    opt = FusedAdam([p], lr=1e-2, amsgrad=True, **options)
    opt.step()
    nan = torch.zeros(4097, dtype=torch.bool)
    nan[[5, 4096]] = True
    for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["max_exp_avg_sq"]):
        assert torch.equal(t.isnan().cpu(), nan)
        assert torch.isfinite(t[~nan.to(t.device)]).all()


# ---- bf16 moments ----------------------------------------------------------------------------------------------

def test_bf16_moments(backend, device):
    """Moments stored in bf16 with stochastic rounding: half the memory, and a trajectory that follows the
    float64 one up to rounding noise that averages out (truncating instead would overshoot by ~1% of the
    distance travelled, 200 times the tolerance on the mean below)."""
    sizes = [(20000,), (1,), (7,), (1000,), (4097,), (0,)]
    init = make_params(sizes, device)
    params, params32 = clones(init), clones(init)
    opt = FusedAdam(params, lr=1e-2, state_dtype=torch.bfloat16, amsgrad=True)
    opt32 = FusedAdam(params32, lr=1e-2, amsgrad=True)
    grads = [[random_grad(p, 1.0) for p in params] for _ in range(STEPS)]
    for g in grads:
        for p, q, gi in zip(params, params32, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.step()
        opt32.step()
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                 amsgrad=True, maximize=False)
    exact, states = reference_run(init, grads, STEPS, dtype=None, mode="exact", **hyper)
    for i, (p, q, e, st) in enumerate(zip(params, params32, exact, states)):
        s = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert s[k].dtype == torch.bfloat16 and s[k].element_size() * 2 == opt32.state[q][k].element_size()
        if not p.numel():
            continue
        got = p.detach().double().cpu()
        assert (got - e).abs().max() < 0.6 * hyper["lr"], f"param {i}"
        assert ((q.detach().double().cpu() - e).abs() < 1e-5).all()
        # A stored moment carries a few bf16 ulps (~1e-3 here) of rounding noise.
        torch.testing.assert_close(s["exp_avg"].double().cpu(), st["exp_avg"], rtol=2e-2, atol=1e-2)
        if i == 0:
            toward = torch.sign(e - init[0].detach().double().cpu())
            assert (got - e).std() < 1.5e-3
            # Signed error along the direction of travel: noise of standard deviation ~4e-6 here.
            assert abs(((got - e) * toward).mean()) < 2e-5, "bf16 moments are biased"


# ---- complex params ------------------------------------------------------------------------------------------

def test_complex_params_match_torch(backend, device):
    init = [torch.randn(n, dtype=torch.complex64, device=device) for n in (1, 7, 300)]
    ours_p = [p.clone().requires_grad_() for p in init]
    torch_p = [p.clone().requires_grad_() for p in init]
    ours = FusedAdam(ours_p, lr=1e-2, weight_decay=0.1, amsgrad=True)
    ref = torch.optim.Adam(torch_p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    for _ in range(30):
        for a, b in zip(ours_p, torch_p):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert ours.state[a][k].dtype == torch.complex64
            torch.testing.assert_close(ours.state[a][k], ref.state[b][k], rtol=1e-5, atol=1e-7)


# ---- layouts ---------------------------------------------------------------------------------------------------

def test_noncontiguous_params_and_grads(backend, device):
    """A transposed (dense) param, a strided (not dense) param, and grads laid out unlike their params."""
    base = torch.randn(12, 10, device=device)
    makers = [
        lambda: base.clone().t().detach(),               # dense, transposed
        lambda: base.clone()[:, ::3].detach(),           # gaps between elements
        lambda: base.clone()[::2].detach(),              # contiguous rows, gaps between them
    ]
    ours_p = [m().requires_grad_() for m in makers]
    torch_p = [m().requires_grad_() for m in makers]
    assert not ours_p[0].is_contiguous() and not ours_p[1].is_contiguous()
    ours = FusedAdam(ours_p, lr=1e-2, amsgrad=True)
    ref = torch.optim.Adam(torch_p, lr=1e-2, amsgrad=True, foreach=False)
    for t in range(20):
        for a, b in zip(ours_p, torch_p):
            g = torch.randn(a.shape[::-1], device=device).t() if t % 2 else torch.randn(a.shape, device=device)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_threads_agree(backend, device, state_dtype):
    """Enough work for the CPU kernel to split it across two threads (over a million elements) and tensors of
    many CUDA blocks: the single-threaded result bit for bit, and torch's."""
    init = make_params([(600000,), (3,), (500001,), (16385,)], device)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        params = clones(init)
        opt = FusedAdam(params, lr=1e-2, amsgrad=True, state_dtype=state_dtype)
        torch.manual_seed(5)
        _train(opt, params, [[random_grad(p, 1.0) for p in params] for _ in range(3)])
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    if state_dtype == torch.float32:
        torch_p = clones(init)
        torch.manual_seed(5)
        _train(torch.optim.Adam(torch_p, lr=1e-2, amsgrad=True, foreach=False), torch_p,
               [[random_grad(p, 1.0) for p in torch_p] for _ in range(3)])
        for a, b in zip(results[0], torch_p):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(cpu=False, emulated=True), indirect=True)
def test_more_tensors_than_one_launch_holds(backend, device):
    """More tensors than the kernel's parameter block holds: the group is launched several times."""
    per_launch = torch.ops.fusedops.adam_tensors_per_launch(False, False)
    count = per_launch + 37
    init = [torch.randn(1 + i % 9, device=device) for i in range(count)]
    ours_p = [p.clone().requires_grad_() for p in init]
    torch_p = [p.clone().requires_grad_() for p in init]
    ours = FusedAdam(ours_p, lr=1e-2)
    ref = torch.optim.Adam(torch_p, lr=1e-2, foreach=False)
    for _ in range(3):
        for a, b in zip(ours_p, torch_p):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert float(ours.state[a]["step"]) == 3.0


# ---- state_dict round trips ---------------------------------------------------------------------------------

def _train(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip_with_torch(backend, device, direction):
    """Train 30 steps in one optimizer, move its state_dict into the other kind, train 30 more: the same
    result as 60 steps in torch.optim.AdamW throughout."""
    init = make_params(SIZES, device)
    grads = [[random_grad(p, 1.0) for p in init] for _ in range(60)]
    hyper = dict(lr=1e-2, weight_decay=0.02, amsgrad=True)
    straight = clones(init)
    _train(torch.optim.AdamW(straight, foreach=False, **hyper), straight, grads)

    first_cls, second_cls = ((torch.optim.AdamW, FusedAdamW) if direction == "torch_to_fused"
                             else (FusedAdamW, torch.optim.AdamW))
    kw = lambda cls: dict(foreach=False) if cls is torch.optim.AdamW else {}  # noqa: E731
    a = clones(init)
    opt_a = first_cls(a, **hyper, **kw(first_cls))
    _train(opt_a, a, grads[:30])
    saved = copy.deepcopy(opt_a.state_dict())
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = second_cls(b, **hyper, **kw(second_cls))
    opt_b.load_state_dict(saved)
    _train(opt_b, b, grads[30:])
    for x, y in zip(b, straight):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
    for x, y in zip(b, straight):
        assert float(opt_b.state[x]["step"]) == 60.0


def test_state_dict_round_trip_fused_options(backend, device):
    """bf16 params with bf16 moments, master weights or stochastic rounding: a run resumed from a state_dict
    (deep-copied, as after torch.save/load) continues bit for bit like the uninterrupted run."""
    for options in (dict(master_weights=True), dict(stochastic_rounding=True, state_dtype=torch.bfloat16)):
        init = make_params([(7,), (1000,), (33, 3)], device, torch.bfloat16)
        grads = [[random_grad(p, 1.0) for p in init] for _ in range(20)]
        straight = clones(init)
        _train(FusedAdamW(straight, lr=1e-2, amsgrad=True, seed=5, **options), straight, grads)
        a = clones(init)
        opt_a = FusedAdamW(a, lr=1e-2, amsgrad=True, seed=5, **options)
        _train(opt_a, a, grads[:10])
        saved = copy.deepcopy(opt_a.state_dict())
        b = [p.detach().clone().requires_grad_() for p in a]
        opt_b = FusedAdamW(b, lr=1e-2, amsgrad=True, seed=5, **options)
        opt_b.load_state_dict(saved)
        for p in b:
            for k, v in opt_b.state[p].items():
                if k == "master_param":
                    assert v.dtype == torch.float32
                elif k != "step":
                    assert v.dtype == options.get("state_dtype", torch.float32), k
        _train(opt_b, b, grads[10:])
        for x, y in zip(b, straight):
            assert torch.equal(x, y), options


def test_master_copy_resynchronized_after_training_elsewhere():
    """A master copy that no longer rounds to the param (the param trained on in torch.optim.Adam after a
    round trip) is replaced by the param, not allowed to undo that training."""
    p = make_params([(100,)], "cpu", torch.bfloat16)
    opt = FusedAdam(p, lr=1e-2, master_weights=True)
    _train(opt, p, [[random_grad(p[0], 1.0)]] * 3)
    saved = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        p[0].add_(0.5)
    opt.load_state_dict(saved)
    assert torch.equal(opt.state[p[0]]["master_param"].to(torch.bfloat16), p[0].detach())


# ---- GradScaler ------------------------------------------------------------------------------------------------

def test_grad_scaler_skips_exactly_the_inf_step(backend, device):
    """torch.amp.GradScaler hands its scale and inf flag to the fused step: grads are unscaled in the kernel
    (and written back unscaled), and the step with an injected inf changes nothing, step counts included."""
    init = make_params([(7,), (1000,), (3, 5)], device)
    weights = [[torch.randn(p.shape, device=device) for p in init] for _ in range(8)]
    inf_step = 4

    def run(params, opt, fused):
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=1000)
        snapshots, grads_after = [], []
        for t, w in enumerate(weights):
            opt.zero_grad()
            loss = sum((p * wi).sum() for p, wi in zip(params, w))
            scaler.scale(loss).backward()
            if t == inf_step:
                params[1].grad[17] = float("inf")
            scaler.step(opt)
            scaler.update()
            snapshots.append([p.detach().clone() for p in params])
            grads_after.append([p.grad.clone() for p in params])
        return snapshots, grads_after, scaler

    ours_p, torch_p = clones(init), clones(init)
    ours = FusedAdam(ours_p, lr=1e-2, weight_decay=0.01)
    assert ours._step_supports_amp_scaling
    snaps, grads_ours, scaler = run(ours_p, ours, True)
    ref_snaps, grads_ref, ref_scaler = run(torch_p, torch.optim.Adam(torch_p, lr=1e-2, weight_decay=0.01,
                                                                     foreach=False), False)
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**11
    for t in range(len(weights)):
        for a, b in zip(snaps[t], ref_snaps[t]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if t != inf_step:  # the kernel unscaled the gradients in place, as the scaler does for torch's Adam
            for a, b in zip(grads_ours[t], grads_ref[t]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(snaps[inf_step], snaps[inf_step - 1]):
        assert torch.equal(a, b), "the step with an inf gradient must not change the params"
    assert float(ours.state[ours_p[0]]["step"]) == len(weights) - 1


# ---- bad input -----------------------------------------------------------------------------------------------

BAD_ARGS = [
    dict(lr=-1e-3),
    dict(lr=torch.tensor([1e-3, 1e-3])),
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(0.9, torch.tensor(0.99))),
    dict(weight_decay=-0.1),
    dict(lr=torch.tensor(1e-3), foreach=True),
    dict(differentiable=True),
    dict(fused=True, foreach=True),
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=lambda k: ",".join(f"{a}" for a in k))
def test_bad_arguments_raise_like_torch(kwargs):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(Exception) as theirs:
        torch.optim.Adam(p, **kwargs)
        if kwargs.get("differentiable"):  # torch accepts it, fused=True does not
            raise RuntimeError("`fused` does not support `differentiable`")
    with pytest.raises(type(theirs.value)) as ours:
        FusedAdam(p, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(state_dtype=torch.float16), "state_dtype"),
    (dict(master_weights=True, stochastic_rounding=True), "master_weights"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_bad_fused_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdam([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_grad_rejected():
    p = torch.zeros(10, requires_grad=True)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([1.0, 2.0]), (10,))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        FusedAdam([p]).step()
    assert torch.equal(p.detach(), torch.zeros(10))


@pytest.mark.parametrize("dtype, options, error, message", [
    (torch.float64, {}, TypeError, "float32, float16, bfloat16 and complex64"),
    (torch.complex64, dict(state_dtype=torch.bfloat16), ValueError, "complex params"),
    (torch.float16, dict(stochastic_rounding=True), ValueError, "bfloat16 params, not float16"),
])
def test_unsupported_param_dtypes(dtype, options, error, message):
    p = torch.ones(4, dtype=dtype, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(error, match=message):
        FusedAdam([p], **options).step()


def _raw_args(n=2, device="cpu", **overrides):
    params = [torch.randn(5, device=device) for _ in range(n)]
    args = dict(params=params, grads=[torch.randn(5, device=device) for _ in range(n)],
                exp_avgs=[torch.zeros(5, device=device) for _ in range(n)],
                exp_avg_sqs=[torch.zeros(5, device=device) for _ in range(n)], max_exp_avg_sqs=[],
                master_params=[], steps=[torch.zeros((), device=device) for _ in range(n)], rng_ids=list(range(n)),
                lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled_weight_decay=False, amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
                stochastic_rounding=False, seed=0, workspace=torch.zeros(1, dtype=torch.int32), backend=0)
    args.update(overrides)
    return args


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(grads=a["grads"][:1]), ValueError, "grads has 1 entries but params has 2"),
    (lambda a: a["grads"].__setitem__(0, a["grads"][0].double()), TypeError, r"grads\[0\] has dtype Double"),
    (lambda a: a["grads"].__setitem__(1, torch.randn(6)), ValueError, r"grads\[1\] has shape"),
    (lambda a: a["params"].__setitem__(0, torch.randn(10)[::2]), ValueError, r"params\[0\] must be dense"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(5, dtype=torch.float16)), TypeError, r"exp_avgs\[0\]"),
    (lambda a: a["exp_avg_sqs"].__setitem__(1, a["exp_avgs"][1]), ValueError, "must not share memory"),
    (lambda a: a["steps"].__setitem__(0, torch.zeros(2)), ValueError, r"steps\[0\] must have one element"),
    (lambda a: a.update(amsgrad=True), ValueError, "max_exp_avg_sqs has 0 entries"),
    (lambda a: a.update(master_params=[torch.zeros(5), None]), ValueError, "master weights are for float16"),
    (lambda a: a.update(params=[p.half() for p in a["params"]], grads=[g.half() for g in a["grads"]],
                        stochastic_rounding=True), ValueError, "stochastic_rounding applies to bfloat16"),
    (lambda a: a.update(beta2=1.0), ValueError, "beta2 must be in"),
    (lambda a: a.update(lr=float("nan")), ValueError, "lr must be"),
    (lambda a: a.update(grad_scale=torch.ones(1, dtype=torch.float64)), TypeError, "grad_scale must be a Float"),
    (lambda a: a.update(backend=1, workspace=None), ValueError, "needs a workspace"),
    (lambda a: a.update(backend=7), ValueError, "backend code 7"),
])
def test_binding_rejects_bad_input(change, error, message):
    args = _raw_args()
    change(args)
    before = [p.clone() for p in args["params"]]
    with pytest.raises(error, match=message):
        torch.ops.fusedops.adam_step_(**args)
    assert all(torch.equal(a, b) for a, b in zip(args["params"], before)), "a rejected call must not write"


# ---- CUDA graphs (GPU only) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [p for p in backend_params(cpu=False, emulated=False)] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no GPU"))], indirect=True)
def test_cuda_graph_capture(backend, device):
    """capturable=True with a tensor lr: the step captured once and replayed matches eager steps."""
    init = make_params(SIZES, device)
    eager_p, graph_p = clones(init), clones(init)
    lr_e, lr_g = torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)
    eager = FusedAdam(eager_p, lr=lr_e, capturable=True, amsgrad=True)
    graphed = FusedAdam(graph_p, lr=lr_g, capturable=True, amsgrad=True)
    grads = [[random_grad(p, 1.0) for p in init] for _ in range(6)]
    for p, g in zip(graph_p, grads[0]):
        p.grad = g.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed.step()  # warm-up: allocates the state
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    _train(eager, eager_p, grads[:1])
    for t, g in enumerate(grads[1:]):
        lr_e.fill_(1e-2 / (t + 2))
        lr_g.fill_(1e-2 / (t + 2))
        for p, q, gi in zip(eager_p, graph_p, g):
            p.grad = gi.clone()
            q.grad.copy_(gi)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_p, graph_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [p for p in backend_params(cpu=False, emulated=False)] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no GPU"))], indirect=True)
def test_cuda_graph_capture_rejects_host_values(backend, device):
    """A float grad_scale (a host tensor each step) cannot be captured: a clear error, not a capture failure."""
    params = make_params(SIZES, device)
    opt = FusedAdam(params, lr=torch.tensor(1e-2, device=device), capturable=True)
    for p in params:
        p.grad = random_grad(p, 1.0)
    opt.step()
    opt.grad_scale = 1024.0
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="grad_scale must be a tensor on cuda"):
        with torch.cuda.graph(graph):
            opt.step()


def test_capture_rejects_gpu_betas(monkeypatch):
    """Tensor betas off the CPU are read on the host each step; under capture that is a clear error. (Runs
    without a GPU: the capture state is faked, and meta tensors stand in for device betas.)"""
    params = make_params(SIZES[:2], "cpu")
    opt = FusedAdam(params, lr=1e-3, betas=(torch.tensor(0.9), torch.tensor(0.999)), capturable=True)
    opt.param_groups[0]["betas"] = (torch.tensor(0.9, device="meta"), torch.tensor(0.999, device="meta"))
    for p in params:
        p.grad = random_grad(p, 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(opt, "_accelerator_graph_capture_health_check", lambda: None)
    with pytest.raises(RuntimeError, match="betas on the GPU"):
        opt.step()
