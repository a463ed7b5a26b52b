import pytest
import torch

from largebatch.config import OptimConfig
from largebatch.models import build_model
from largebatch.config import ModelConfig
from largebatch.optim import apply_schedule, build_optimizer, param_groups
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.layerwise import LayerwiseOptimizer


def test_lars_step_matches_formula():
    w = torch.tensor([3.0, 4.0], requires_grad=True)          # ||w|| = 5
    b = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = LARS([{"params": [w], "adapt": True}, {"params": [b], "adapt": False}],
               lr=0.5, momentum=0.9, weight_decay=0.01, trust=0.02, eps=0.0)
    g = torch.tensor([0.6, 0.8])                                # ||g|| = 1
    for step in range(2):
        w.grad, b.grad = g.clone(), g.clone()
        opt.step()
        if step == 0:
            ratio = 0.02 * 5 / (1 + 0.01 * 5)
            d = (g + 0.01 * torch.tensor([3.0, 4.0])) * ratio
            assert w.detach() == pytest.approx((torch.tensor([3.0, 4.0]) - 0.5 * d).tolist(), rel=1e-6)
            db = g + 0.01 * torch.tensor([1.0, -1.0])           # no trust ratio on the bias
            assert b.detach() == pytest.approx((torch.tensor([1.0, -1.0]) - 0.5 * db).tolist(), rel=1e-6)
            w1, buf = w.detach().clone(), d
    ratio = 0.02 * w1.norm() / (1 + 0.01 * w1.norm())
    d2 = (g + 0.01 * w1) * ratio
    assert w.detach() == pytest.approx((w1 - 0.5 * (0.9 * buf + d2)).tolist(), rel=1e-5)


def test_lars_zero_weight_takes_plain_step():
    w = torch.zeros(3, requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.0, trust=0.001)
    w.grad = torch.ones(3)
    opt.step()
    assert w.detach().tolist() == [-1.0, -1.0, -1.0]


def test_param_groups_by_module_type_catch_downsample_bn():
    model = build_model(ModelConfig(name="resnet50"), 3, 10)
    decay, rest = param_groups(model, OptimConfig(exclude_bn_bias_from_wd=True))
    ds_bn = model.layer1[0].downsample[1]   # named "downsample.1": no "bn" in the name
    assert any(p is ds_bn.weight for p in rest["params"])
    assert any(p is model.fc.bias for p in rest["params"])
    assert any(p is model.fc.weight for p in decay["params"])
    n_bn = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(rest["params"]) == 2 * n_bn + 1
    assert rest["wd_scale"] == 0.0 and decay["wd_scale"] == 1.0
    opt = build_optimizer(model, OptimConfig(exclude_bn_bias_from_wd=True))
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-5, 0.0]  # set once, by apply_schedule


def test_apply_schedule_keeps_excluded_group_at_zero_wd():
    model = build_model(ModelConfig(name="resnet8"), 1, 10)
    opt = build_optimizer(model, OptimConfig(exclude_bn_bias_from_wd=True, name="lars"))
    apply_schedule(opt, lr=0.3, weight_decay=2e-4)
    assert [(g["lr"], g["weight_decay"], g["adapt"]) for g in opt.param_groups] == \
        [(0.3, 2e-4, True), (0.3, 0.0, False)]


def test_lamb_step_matches_formula():
    """Adam's bias-corrected update plus weight decay, scaled to ||w|| / ||update|| on
    adapted tensors; BN and biases (adapt=False) take the plain Adam step."""
    w0, b0 = torch.tensor([3.0, 4.0]), torch.tensor([1.0, -1.0])
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LAMB([{"params": [w], "adapt": True, "weight_decay": 0.01}, {"params": [b], "adapt": False}],
               lr=0.1, betas=(0.9, 0.99), eps=1e-6)
    grads = [torch.tensor([0.6, 0.8]), torch.tensor([-0.3, 0.1])]
    m = v = torch.zeros(2)
    want_w, want_b = w0.clone(), b0.clone()
    mb = vb = torch.zeros(2)
    for t, g in enumerate(grads, start=1):
        w.grad, b.grad = g.clone(), g.clone()
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        u = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.99 ** t)).sqrt() + 1e-6) + 0.01 * want_w
        want_w = want_w - 0.1 * (want_w.norm() / u.norm()) * u
        mb, vb = 0.9 * mb + 0.1 * g, 0.99 * vb + 0.01 * g * g
        want_b = want_b - 0.1 * (mb / (1 - 0.9 ** t)) / ((vb / (1 - 0.99 ** t)).sqrt() + 1e-6)
        torch.testing.assert_close(w.detach(), want_w)
        torch.testing.assert_close(b.detach(), want_b)
    # every adapted step moves the weights by lr times their norm
    assert (w0 - w.detach()).norm() > 0


def test_lamb_from_config_and_resume_state():
    model = build_model(ModelConfig(name="resnet8", bn_group_size=0), 1, 10)
    opt = build_optimizer(model, OptimConfig(exclude_bn_bias_from_wd=True, name="lamb", lamb_beta2=0.98))
    assert isinstance(opt, LAMB) and opt.param_groups[0]["betas"] == (0.9, 0.98)
    apply_schedule(opt, lr=0.01, weight_decay=1e-4)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    again = build_optimizer(model, OptimConfig(exclude_bn_bias_from_wd=True, name="lamb", lamb_beta2=0.98))
    again.load_state_dict(opt.state_dict())  # what a checkpoint carries
    p = next(model.parameters())
    assert again.state[p]["step"].item() == 1 and torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_sgd_takes_torchs_fused_step_with_the_loops_result():
    model = build_model(ModelConfig(name="resnet8", bn_group_size=0), 1, 10)
    twin = build_model(ModelConfig(name="resnet8", bn_group_size=0), 1, 10)
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(exclude_bn_bias_from_wd=True, momentum=0.9, nesterov=True)
    fused = build_optimizer(model, cfg)
    loop = torch.optim.SGD(param_groups(twin, cfg), lr=0.0, momentum=0.9, nesterov=True, foreach=False)
    assert all(g["fused"] for g in fused.param_groups)
    for opt in (fused, loop):
        apply_schedule(opt, lr=0.1, weight_decay=1e-3)
    x = torch.randn(8, 1, 28, 28)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_by_group_computes_the_per_tensor_update(device, nesterov, monkeypatch):
    """The multi-tensor form (a GPU's) against the per-tensor loop (a CPU's), over steps
    that create and then use the momentum buffers, with weight decay on both groups, a
    zero-init weight (trust ratio 1) and a tensor without a gradient."""
    models, opts = [], []
    for by_group in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="resnet8", bn_group_size=0), 1, 10).to(device)
        torch.nn.init.zeros_(model.fc.weight)
        model.fc.bias.requires_grad_(False)
        opt = build_optimizer(model, OptimConfig(name="lars", momentum=0.9, nesterov=nesterov))
        apply_schedule(opt, lr=0.5, weight_decay=1e-3)
        # each optimizer held to one form, whatever its device
        if by_group:
            monkeypatch.setattr(opt, "update_group", lambda g, o=opt: o.update_by_group(
                [p for p in g["params"] if p.grad is not None], g))
        else:
            monkeypatch.setattr(opt, "update_group", lambda g, o=opt: LayerwiseOptimizer.update_group(o, g))
        models.append(model)
        opts.append(opt)
    x = torch.randn(8, 1, 28, 28, device=device)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(opts[1].state) == len(opts[0].state) > 0  # the momentum buffers are kept, for checkpoints
    for p, q in zip(*(m.parameters() for m in models)):
        if p in opts[0].state:
            torch.testing.assert_close(opts[1].state[q]["momentum_buffer"], opts[0].state[p]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_lars_takes_the_multi_tensor_form_on_a_gpu(monkeypatch):
    w = torch.ones(3, device="cuda", requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.0)
    calls = []
    monkeypatch.setattr(opt, "update", lambda p, g: calls.append(p))
    w.grad = torch.ones(3, device="cuda")
    opt.step()
    assert calls == [] and w.detach().lt(1).all()
