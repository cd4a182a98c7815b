"""Seeds: one derivation with named streams; the torchrun environment read in one place."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.distributed import TorchrunEnv, torchrun_env
from medsynth.errors import JobError
from medsynth.seeds import CaseTag, MixTag, PairStream, Stream, derive_seed, seed_sequence


def test_derive_seed_by_hand() -> None:
    state = np.random.SeedSequence([5, 13, 2]).generate_state(2, dtype=np.uint32)
    expected = ((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)
    assert derive_seed(5, Stream.SYNTH_ITEM, 2) == expected
    assert 0 <= derive_seed(0) < 2**63 and derive_seed(1, 2) != derive_seed(2, 1)


def test_stream_tags_are_distinct_and_keep_their_numbers() -> None:
    # the numbers decide what a seed makes: the ones runs were made with stay
    assert (Stream.TRAIN_STEP, Stream.GAN_EVAL, Stream.SYNTH_ITEM) == (7, 11, 13)
    for enum in (Stream, CaseTag, PairStream, MixTag):
        values = [int(m) for m in enum]
        assert len(values) == len(set(values)), enum
    assert seed_sequence(3, CaseTag.DONOR, 4).spawn_key == (1, 4)
    assert seed_sequence(3, 1, 4).generate_state(2).tolist() == \
        np.random.SeedSequence(entropy=3, spawn_key=(1, 4)).generate_state(2).tolist()


def test_torchrun_env() -> None:
    assert torchrun_env({}) == TorchrunEnv(rank=0, local_rank=0, world_size=1)
    env = torchrun_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size, env.distributed, env.is_main) == (3, 1, 4, True, False)
    with pytest.raises(JobError, match="RANK='x' is not an integer"):
        torchrun_env({"RANK": "x"})
    with pytest.raises(JobError, match="inconsistent"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
