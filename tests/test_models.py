import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from largebatch.config import ConfigError, ModelConfig
from largebatch.models import build_model, group_bn, model_channels


# The BN-group kernels are called directly (aten's native batch norm): on a GPU too.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar_resnet_depths_and_shapes():
    # He et al. 2016: resnet20 0.27M, resnet56 0.85M parameters (our 1x1-conv shortcuts add a little)
    assert 0.26e6 < n_params(build_model(ModelConfig(name="resnet20"), 3, 10)) < 0.29e6
    assert 0.84e6 < n_params(build_model(ModelConfig(name="resnet56"), 3, 10)) < 0.87e6
    m = build_model(ModelConfig(name="resnet8", bn_group_size=0), 1, 7)
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 7)


def test_resnet50_is_torchvisions_unmodified():
    ours = build_model(ModelConfig(name="resnet50", zero_init_gamma="none"), 3, 1000)
    ref = torchvision.models.resnet50(weights=None)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert n_params(ours) == n_params(ref) == 25_557_032
    ours.load_state_dict(ref.state_dict())  # interchangeable checkpoints


@pytest.mark.parametrize("which,expect", [("all", 16), ("last_per_stage", 4), ("none", 0)])
def test_zero_init_gamma(which, expect):
    m = build_model(ModelConfig(name="resnet50", zero_init_gamma=which), 3, 10)
    zeros = [n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d) and mod.weight.abs().sum() == 0]
    assert len(zeros) == expect
    if which == "last_per_stage":
        assert zeros == ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"]


def test_channel_mismatch_names_the_key():
    with pytest.raises(ConfigError, match="model.name: resnet50"):
        model_channels(ModelConfig(name="resnet50"), 1)
    with pytest.raises(ConfigError, match="model.in_channels"):
        model_channels(ModelConfig(name="resnet8", in_channels=3), 1)
    with pytest.raises(ConfigError, match="unknown model"):
        model_channels(ModelConfig(name="vgg16"), 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_group_bn_normalises_each_group_like_plain_bn(fmt, device):
    """Forward and backward, in both memory formats: each group is its own batch."""
    torch.manual_seed(0)
    x = (torch.randn(12, 3, 5, 5, device=device) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
    gbn = group_bn.GroupBatchNorm2d(3, group_size=4).to(device)
    nn.init.uniform_(gbn.weight)
    nn.init.uniform_(gbn.bias)
    ref = nn.BatchNorm2d(3).to(device)
    ref.load_state_dict(gbn.state_dict())
    x_ref = x.detach().contiguous().requires_grad_()
    y, want = gbn(x), torch.cat([ref(part) for part in x_ref.split(4)])
    torch.testing.assert_close(y, want)
    assert y.is_contiguous(memory_format=fmt)  # the layer keeps the format the convolutions chose
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert x.grad.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gbn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(gbn.bias.grad, ref.bias.grad)
    groups = x.detach().double().transpose(0, 1).reshape(3, 3, -1)  # (channel, group, values)
    torch.testing.assert_close(gbn.stat_sum, torch.stack([groups.mean(2).sum(1), groups.var(2).sum(1)]),
                               rtol=1e-5, atol=1e-5)  # the kernels accumulate in fp32


def test_group_bn_running_stats_are_one_update_per_step_from_all_groups():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 3, 3)
    gbn = group_bn.GroupBatchNorm2d(2, group_size=2, momentum=0.5)
    model = nn.Sequential(gbn)
    model(x[:4])
    model(x[4:])      # two micro-batches of one step
    group_bn.commit_running_stats(model)
    groups = x.view(4, 2, 2, 3, 3)
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.transpose(1, 2).reshape(4, 2, -1).var(dim=2, unbiased=True).mean(0)
    torch.testing.assert_close(gbn.running_mean, 0.5 * mean)
    torch.testing.assert_close(gbn.running_var, 0.5 * 1 + 0.5 * var)
    assert gbn.num_batches_tracked.item() == 1
    assert gbn.stat_count.item() == 0  # reset for the next step
    gbn.eval()
    torch.testing.assert_close(gbn(x), (x - gbn.running_mean.view(1, -1, 1, 1)) /
                               torch.sqrt(gbn.running_var.view(1, -1, 1, 1) + gbn.eps))


@pytest.mark.parametrize("group", [4, 8])
def test_group_bn_traced_by_torch_compile_computes_what_the_native_kernel_does(monkeypatch, group):
    """Compiled, group BN runs as fusable reductions and pointwise operations: the same
    output, gradients and running statistics as the native kernel eager."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    native = group_bn.GroupBatchNorm2d(3, group_size=group, momentum=0.5)
    nn.init.uniform_(native.weight)
    nn.init.uniform_(native.bias)
    fusable = group_bn.GroupBatchNorm2d(3, group_size=group, momentum=0.5)
    fusable.load_state_dict(native.state_dict())
    outs = []
    for gbn, compiling in ((native, False), (fusable, True)):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        xi = x.clone().requires_grad_()
        y = gbn(xi)
        y.mul(torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        group_bn.commit_running_stats(nn.Sequential(gbn))
        outs.append((y, xi.grad, gbn.weight.grad, gbn.bias.grad, gbn.running_mean, gbn.running_var))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_running_stats_commit_is_each_layers_update_in_a_fixed_number_of_operations():
    """Layers of different widths and momenta, one that saw no group this step: each gets
    exactly its own update; and the commit issues as many operations for ResNet-50's 53
    layers as for ResNet-8's 7 (on a GPU each would be a kernel launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    layers = [group_bn.GroupBatchNorm2d(c, group_size=2, momentum=m) for c, m in ((3, 0.1), (5, 0.5), (4, 0.1))]
    model = nn.Sequential(*layers)
    for layer in layers[:2]:
        layer(torch.randn(4, layer.num_features, 3, 3))
        layer(torch.randn(2, layer.num_features, 3, 3))
        layer.running_mean.uniform_()
    want = []
    for layer in layers:
        count = layer.stat_count.item()
        mean, var = (layer.stat_sum / max(count, 1)).float()
        keep, take = (1 - layer.momentum, layer.momentum) if count else (1.0, 0.0)
        want.append((layer.running_mean * keep + mean * take, layer.running_var * keep + var * take,
                     layer.num_batches_tracked + (count > 0)))
    group_bn.commit_running_stats(model)
    for layer, (mean, var, tracked) in zip(layers, want):
        assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
        assert layer.num_batches_tracked == tracked and layer.stat_count == 0 and not layer.stat_sum.any()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n = getattr(self, "n", 0) + (not func.is_view)  # a view launches no kernel
            return func(*args, **(kwargs or {}))
    counts = []
    for name in ("resnet8", "resnet50"):
        model = build_model(ModelConfig(name=name, bn_group_size=2), 3, 10)
        model(torch.randn(4, 3, 32, 32))
        group_bn.commit_running_stats(model)  # the first builds the layout, once per model
        model(torch.randn(4, 3, 32, 32))
        with Count() as counter:
            group_bn.commit_running_stats(model)
        counts.append(counter.n)
    assert counts[0] == counts[1] < 40


def test_the_triton_group_bn_candidate_computes_what_the_layer_does():
    """experiments/bn_group_triton.py: output, gradients and statistics against torch's
    batch norm per group, on shapes that cut groups into slices and blocks across groups;
    compiled on a GPU, else under Triton's interpreter on the CPU (a GPU times it in
    bn_group_forms.py)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    # compiled where there is a GPU, as bn_group_forms.py times them (the interpreter of
    # the Triton that torch 2.11 brings failed on these kernels there)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if torch.cuda.is_available() else \
        {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(root / "experiments" / "bn_group_triton.py")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "matches" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("functional", [False, True], ids=["native", "F.batch_norm"])
def test_the_gathered_group_bn_candidate_computes_what_the_layer_does(functional):
    """experiments/bn_group_forms.py's GatheredFn (the groups as the channels of one call,
    timed in a whole step on a GPU by gpu_check.sh): output, gradients and statistics as
    the layer's, and an output of its own, so that the model's in-place ReLU after it adds
    no as_strided node to the backward (which made the view-returning form slow)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from bn_group_forms import gathered_function
    torch.manual_seed(0)
    layers = [group_bn.GroupBatchNorm2d(32, group_size=3, fuse_relu=False) for _ in range(2)]
    nn.init.uniform_(layers[0].weight)
    nn.init.uniform_(layers[0].bias)
    layers[1].load_state_dict(layers[0].state_dict())
    x = (torch.randn(9, 32, 4, 5) * 2 + 1).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in layers]
    dy = torch.randn_like(x)
    want, got = layers[0](xs[0]), torch.relu_(gathered_function(layers[1], xs[1], functional))
    nodes = [got.grad_fn, *(f for f, _ in got.grad_fn.next_functions if f is not None)]
    assert not [f for f in nodes if type(f).__name__ in ("AsStridedBackward0", "CopySlices")]
    torch.relu_(want).backward(dy)
    got.backward(dy)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(layers[1], name).grad, getattr(layers[0], name).grad)
    torch.testing.assert_close(layers[1].stat_sum, layers[0].stat_sum)


def test_group_bn_without_statistics_keeps_its_running_averages():
    gbn = group_bn.GroupBatchNorm2d(2, group_size=2, momentum=0.5)
    gbn.running_mean.fill_(0.25)
    group_bn.commit_running_stats(nn.Sequential(gbn))  # a step in which this layer saw nothing
    assert gbn.running_mean.tolist() == [0.25, 0.25] and gbn.running_var.tolist() == [1.0, 1.0]
    assert gbn.num_batches_tracked.item() == 0


def test_group_bn_rejects_ragged_batch():
    gbn = group_bn.GroupBatchNorm2d(2, group_size=4)
    with pytest.raises(ValueError, match="bn_group_size"):
        gbn(torch.randn(6, 2, 3, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_group_bn_under_bf16_autocast(fmt, device):
    """bf16 activations, fp32 parameters and statistics, as in training."""
    gbn = group_bn.GroupBatchNorm2d(4, group_size=2).to(device)
    conv = nn.Conv2d(3, 4, 3).to(device, memory_format=fmt)
    x = torch.randn(4, 3, 8, 8, device=device).contiguous(memory_format=fmt)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = gbn(conv(x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert gbn.stat_count.item() == 2
    y.float().square().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(gbn.weight.grad).all()


def test_sync_bn_on_one_process_equals_plain_bn_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float32)
    sbn = group_bn.GroupBatchNorm2d(3, sync=True)
    nn.init.uniform_(sbn.weight)
    nn.init.uniform_(sbn.bias)
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(sbn.state_dict())
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(6, 3, 4, 4)
    (sbn(xs) * w).sum().backward()
    (ref(xr) * w).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sbn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sbn.bias.grad, ref.bias.grad)
    group_bn.commit_running_stats(nn.Sequential(sbn))
    torch.testing.assert_close(sbn.running_mean, ref.running_mean)
    torch.testing.assert_close(sbn.running_var, ref.running_var)
