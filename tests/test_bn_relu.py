"""Batch norm and ReLU (and the residual addition between them) fused into one CPU
kernel pair (largebatch/models/bn_relu.py): the same results as torch's separate
kernels, the same running statistics, and the separate kernels wherever it does not
apply."""
import os

import pytest
import torch

from largebatch.config import ModelConfig
from largebatch.models import bn_relu, build_model
from largebatch.models.group_bn import GroupBatchNorm2d, commit_running_stats

needs_avx512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                  reason="the fused kernels are built for AVX-512 CPUs")


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """The difference relative to the reference's size."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def layer_pair(c: int, group: int) -> tuple[GroupBatchNorm2d, GroupBatchNorm2d]:
    fused, plain = GroupBatchNorm2d(c, group, fuse_relu=True), GroupBatchNorm2d(c, group, fuse_relu=False)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.3, 0.3)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@needs_avx512
@pytest.mark.parametrize("group", [8, 4])  # one group of the batch, two
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_layer_matches_the_separate_kernels(group, with_residual):
    torch.manual_seed(0)
    shape = (8, 64, 12, 12)
    fused, plain = layer_pair(64, group)
    as_cl = lambda t: t.bfloat16().contiguous(memory_format=torch.channels_last)  # noqa: E731
    x, r, dy = as_cl(torch.randn(shape) * 2 + 0.5), as_cl(torch.randn(shape)), as_cl(torch.randn(shape))
    assert bn_relu.applies(x, 64)
    results = []
    for layer in (fused, plain):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = layer.forward_relu(xi, ri if with_residual else None)
        y.backward(dy)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.stat_sum.clone(),
                        ri.grad if with_residual else torch.zeros(1)))
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "statistics", "dresidual"), *results):
        assert close(a, b) < 1e-2, name  # bf16 activations: both round to 8 bits of mantissa
    assert fused.stat_count == plain.stat_count == 8 // group
    assert (results[0][0] >= 0).all()


@needs_avx512
def test_fused_model_trains_as_the_separate_kernels(monkeypatch):
    """A ResNet-18 step in bf16 and channels_last: loss, gradients and the running
    statistics committed after the step agree with the unfused model's."""
    torch.manual_seed(0)
    models = [build_model(ModelConfig(name="resnet18", bn_group_size=4, fuse_bn_relu=f), 3, 10)
              .to(memory_format=torch.channels_last) for f in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    calls = []
    original = bn_relu.BNReLU.apply
    monkeypatch.setattr(bn_relu.BNReLU, "apply", lambda *a: calls.append(1) or original(*a))
    losses = []
    for m in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        commit_running_stats(m)
        losses.append(loss.item())
        if m is models[0]:
            assert len(calls) == 17  # the stem and both norms of each of the 8 blocks
    assert len(calls) == 17  # none in the unfused model
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in models]
    assert close(*grads) < 0.05
    for a, b in zip(models[0].buffers(), models[1].buffers()):
        if a.is_floating_point():
            assert close(a, b) < 1e-2


def test_the_separate_kernels_run_where_the_fused_ones_do_not_apply(monkeypatch):
    """fp32, the contiguous layout, channels not a multiple of 32, evaluation, and
    model.fuse_bn_relu=false: never the extension, the same results as before."""
    monkeypatch.setattr(bn_relu, "extension", lambda: pytest.fail("the fused kernels ran"))
    cl = torch.channels_last
    inputs = {"fp32": torch.randn(4, 64, 6, 6).contiguous(memory_format=cl),
              "contiguous": torch.randn(4, 64, 6, 6).bfloat16(),
              "48 channels": torch.randn(4, 48, 6, 6).bfloat16().contiguous(memory_format=cl)}
    for x in inputs.values():
        fused, plain = layer_pair(x.shape[1], 0)
        assert torch.equal(fused.forward_relu(x), torch.relu(plain(x)))
    xb = torch.randn(4, 64, 6, 6).bfloat16().contiguous(memory_format=cl)  # what the kernels take
    fused, plain = layer_pair(64, 0)
    fused.eval(), plain.eval()
    assert torch.equal(fused.forward_relu(xb), torch.relu(plain(xb)))
    fused.train(), plain.train()
    plain.forward_relu(xb)  # fuse_relu=False


def test_each_torch_installation_builds_the_kernels_in_a_folder_of_its_own():
    """Two environments (or checkouts with their own) alternating would otherwise rebuild
    the kernels at every switch: the build file names torch's folders."""
    here = bn_relu.build_name("/venv-a/lib/python3.11/site-packages/torch")
    assert here == bn_relu.build_name("/venv-a/lib/python3.11/site-packages/torch")
    assert here != bn_relu.build_name("/venv-b/lib/python3.11/site-packages/torch")
    assert here.startswith("largebatch_bn_relu_") and here.isidentifier()  # a Python module's name
    assert bn_relu.NAME == bn_relu.build_name(os.path.dirname(os.path.abspath(torch.__file__)))


def test_a_kernel_that_cannot_be_built_falls_back_with_one_line(monkeypatch, capsys, tmp_path):
    cpp = bn_relu._import_cpp_extension()  # quietly, as the layer does
    monkeypatch.setattr(bn_relu, "_extension", None)
    monkeypatch.setattr(bn_relu, "_failed", False)
    monkeypatch.setattr(cpp, "load_inline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    lock = tmp_path / bn_relu.NAME / "lock"  # left by a build that was killed: torch would wait on it forever
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (0, 0))
    assert bn_relu.extension() is None and bn_relu.extension() is None
    assert not lock.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no compiler" in err and "separate kernels" in err
    layer = GroupBatchNorm2d(64, 0)
    xb = torch.randn(4, 64, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    assert not bn_relu.applies(xb, 64)
    assert (layer.forward_relu(xb) >= 0).all()


def test_the_zoo_computes_torchvisions_resnets():
    """fused_blocks.py calls torchvision's layers in a different grouping: the same
    function, and the same state_dict keys, as torchvision's own model (here in fp32,
    where nothing is fused)."""
    import torchvision
    for name in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        ours = build_model(ModelConfig(name=name, bn_group_size=0, zero_init_gamma="none"), 3, 10)
        theirs = getattr(torchvision.models, name)(num_classes=10)
        theirs.load_state_dict(ours.state_dict())  # strict: the same keys
        x = torch.randn(4, 3, 64, 64)
        ours.eval(), theirs.eval()
        assert torch.equal(ours(x), theirs(x))
        ours.train(), theirs.train()  # batch statistics (the running ones are updated differently)
        assert torch.equal(ours(x), theirs(x))
