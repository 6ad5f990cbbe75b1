"""Stage 3 specifics: segment process groups are made once and reused; its group rule."""

import pytest
import workers

from lessons.launch import run_on_ranks


def test_segment_groups_are_created_once_and_reused():
    counts, groups = run_on_ranks(workers.stage3_groups_are_cached, 4)[0]
    # N=256 on 4 ranks: pair (128, 4) has segment groups {0,1}, {2,3}; pair (256, 8) has {0,1,2,3}
    assert counts == [3, 0]
    assert groups == [(0, 1), (0, 1, 2, 3), (2, 3)]


def test_group_must_be_the_world():
    with pytest.raises(RuntimeError, match=r"ValueError: group has 2 of the world's 4 ranks: stage 3 creates"):
        run_on_ranks(workers.stage3_in_a_subgroup, 4, timeout=60)
