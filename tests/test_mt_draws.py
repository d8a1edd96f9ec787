"""Exp(1) draws through numpy's Mersenne Twister (engine/mt_draws.py) equal torch's own `exponential_` draw for draw,
and leave the generator where torch's would: sampling with them picks what `torch.multinomial` picks."""
import torch

from funaudiochat.engine.mt_draws import exponential_draws
from funaudiochat.engine.sampling import MT_DRAWS_MIN, SamplingParams, choose, exponential_noise


def test_draws_and_generator_state_equal_torch_exponential():
    # sizes across the generator's 624-word twists, the engine's 5 x B x 6565 speech groups, and 2 M draws
    for seed, sizes in ((0, [(1,), (3,), (311,), (312,), (313,), (624,), (1000,)]),
                        (7, [(5, 2, 6565)] * 6),
                        (12345, [(2_000_000,), (4, 49152)])):
        theirs, ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.rand(77, generator=theirs), torch.rand(77, generator=ours)  # start mid-stream
        for shape in sizes:
            want = torch.empty(shape).exponential_(1, generator=theirs)
            got = exponential_draws(shape, ours)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert torch.equal(got, want), (seed, shape, int((got != want).sum()))
            assert torch.equal(ours.get_state(), theirs.get_state()), (seed, shape)
        # whatever draws next continues the same stream
        assert torch.equal(torch.randn(100, generator=ours), torch.randn(100, generator=theirs))


def test_noise_without_a_generator_draws_from_the_default_one():
    shape = (2, MT_DRAWS_MIN)
    torch.manual_seed(5)
    want = torch.empty(shape).exponential_(1)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(exponential_noise(shape, None), want)
    assert torch.equal(torch.rand(3), after)


def test_sampled_choice_equals_torch_multinomial():
    """`choose` with these draws samples what torch.multinomial samples from the same generator state."""
    scores = torch.randn(3, 40000, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(do_sample=True)
    for seed in range(5):
        ours = choose(scores, params, generator=torch.Generator().manual_seed(seed))
        theirs = torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        assert ours.tolist() == theirs.tolist()
