import pytest
import torch

from largebatch.config import OptimConfig
from largebatch.models import build_model
from largebatch.config import ModelConfig
from largebatch.optim import apply_schedule, build_optimizer, param_groups
from largebatch.optim.lars import LARS


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
