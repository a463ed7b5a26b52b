
import numpy as np
import pytest

from largebatch.config import TrainConfig
from largebatch.data.sampler import GlobalBatchSampler, eval_batches, epoch_permutation, sample_uniforms
from largebatch.dist import resolve_layout


def specs(n, world, rank, global_batch, micro, start, stop, seed=3):
    lay = resolve_layout(TrainConfig(global_batch=global_batch, micro_batch=micro), world, rank)
    return list(GlobalBatchSampler(n, lay, seed).micro_batches(start, stop))


def test_every_sample_once_per_epoch_across_processes():
    n, b = 103, 12                      # 8 steps per epoch, 7 samples left out per epoch
    for world in (1, 2, 3):
        seen = [i for r in range(world) for s in specs(n, world, r, b, 2, 0, 8) for i in s.indices]
        assert len(seen) == len(set(seen)) == 8 * b
        assert {s.epoch for r in range(world) for s in specs(n, world, r, b, 2, 0, 8)} == {0}
    # the next epoch is a different permutation
    assert specs(n, 1, 0, b, 12, 8, 9)[0].indices != specs(n, 1, 0, b, 12, 0, 1)[0].indices
    assert specs(n, 1, 0, b, 12, 8, 9)[0].epoch == 1


def test_layouts_cut_the_same_global_batch_into_the_same_chunks():
    one = specs(1000, 1, 0, 16, 4, 0, 5)                      # 1 process x 4 micro-steps
    two = [specs(1000, 2, r, 16, 4, 0, 5) for r in range(2)]  # 2 processes x 2 micro-steps
    four = [specs(1000, 4, r, 16, 4, 0, 5) for r in range(4)]
    for step in range(5):
        chunks1 = [s.indices for s in one[4 * step:4 * step + 4]]
        chunks2 = [two[c % 2][2 * step + c // 2].indices for c in range(4)]
        chunks4 = [four[c][step].indices for c in range(4)]
        assert chunks1 == chunks2 == chunks4


def test_resume_mid_epoch_continues_the_same_order():
    full = specs(500, 2, 1, 40, 10, 0, 30)
    tail = specs(500, 2, 1, 40, 10, 17, 30)
    assert [s.indices for s in full[17 * 2:]] == [s.indices for s in tail]


def test_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(50, seed=1, epoch=2)
    assert a.tolist() == epoch_permutation(50, seed=1, epoch=2).tolist()
    assert a.tolist() != epoch_permutation(50, seed=1, epoch=3).tolist()
    assert sorted(a.tolist()) == list(range(50))


def test_sample_uniforms_are_per_sample_and_reproducible():
    u = sample_uniforms(7, 1, [5, 9, 5], 4)
    assert u.shape == (3, 4) and ((0 <= u) & (u < 1)).all()
    np.testing.assert_array_equal(u[0], u[2])
    np.testing.assert_array_equal(u[1], sample_uniforms(7, 1, [9], 4)[0])
    assert not np.array_equal(u[0], sample_uniforms(7, 2, [5], 4)[0])
    big = sample_uniforms(0, 0, range(20000), 1)
    assert abs(big.mean() - 0.5) < 0.01


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_shards_cover_each_sample_once(world):
    got = [i for r in range(world) for s in eval_batches(101, 8, r, world) for i in s.indices]
    assert sorted(got) == list(range(101))
