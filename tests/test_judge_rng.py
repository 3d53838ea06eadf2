"""The attribute judge leaves the global RNGs alone: building it (seeded from its config) must not reseed torch's
global generator, or every random draw after an evaluation would depend on whether a judge was built."""

from __future__ import annotations

import random

import numpy as np
import torch

from nodule_diffusion.data import DEFAULT_VOCAB
from nodule_diffusion.judge import AttributeJudge, JudgeConfig


def _global_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_building_a_judge_does_not_touch_the_global_rngs():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = _global_states()
    AttributeJudge(DEFAULT_VOCAB, JudgeConfig(seed=0))
    AttributeJudge(DEFAULT_VOCAB, JudgeConfig(seed=1))
    after = _global_states()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_the_judge_init_depends_on_its_seed_not_on_the_global_rng():
    torch.manual_seed(0)
    a = AttributeJudge(DEFAULT_VOCAB, JudgeConfig(seed=3))
    torch.manual_seed(99)
    b = AttributeJudge(DEFAULT_VOCAB, JudgeConfig(seed=3))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
