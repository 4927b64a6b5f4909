"""2-D RoPE positions and rotation properties; block-causal mask semantics."""

import pytest
import torch

from vargpt.decoder.masks import block_causal_mask, scale_index_per_token
from vargpt.decoder.rope import RotaryEmbedding2D, apply_rope, rope_tables, scale_positions
from vargpt.schedules import final_grid, scale_schedule, scale_starts


def test_positions_on_the_1m_grid_at_1_to_1():
    grid = final_grid(1.0, "1M")
    assert grid == (64, 64)
    schedule = scale_schedule("1M", 1.0)
    positions = scale_positions(schedule, grid)
    starts = scale_starts(schedule)
    by_scale = {hw: positions[s : s + hw[0] * hw[1]] for hw, s in zip(schedule, starts)}
    assert by_scale[(1, 1)].tolist() == [[0, 0]]
    assert sorted(set(by_scale[(2, 2)][:, 0].tolist())) == [0, 32]
    assert sorted(set(by_scale[(6, 6)][:, 0].tolist())) == [0, 11, 21, 32, 43, 53]
    assert sorted(set(by_scale[(6, 6)][:, 1].tolist())) == [0, 11, 21, 32, 43, 53]
    assert sorted(set(by_scale[(16, 16)][:, 0].tolist())) == list(range(0, 64, 4))
    full = by_scale[(64, 64)]
    assert torch.equal(full[:, 0], torch.arange(64).repeat_interleave(64))
    assert torch.equal(full[:, 1], torch.arange(64).repeat(64))


def test_positions_are_row_major_rows_then_columns():
    positions = scale_positions([(2, 3)], (4, 6))
    assert positions.tolist() == [[0, 0], [0, 2], [0, 4], [2, 0], [2, 2], [2, 4]]


def test_rounding_is_half_to_even_like_the_reference():
    # aspect 2.0: final 1M grid is (90, 45); the 60x30 scale has steps of exactly 1.5, so ties occur
    grid = final_grid(2.0, "1M")
    assert grid == (90, 45)
    columns = scale_positions([(60, 30)], grid)[:30, 1].tolist()
    assert columns[:5] == [0, 2, 3, 4, 6]  # 1.5 -> 2, 3.0 -> 3, 4.5 -> 4 (not 5), 6.0 -> 6


def test_positions_for_a_custom_schedule_and_non_square_grid():
    positions = scale_positions([(1, 1), (2, 3), (3, 5)], (45, 90))
    assert positions.shape == (1 + 6 + 15, 2)
    assert positions[0].tolist() == [0, 0]
    assert positions[1:7, 1].tolist() == [0, 30, 60, 0, 30, 60]


def test_rope_is_a_rotation_that_preserves_norms():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_tables(scale_positions([(1, 1), (3, 3), (5, 5)], (64, 64)), head_dim, 10000.0)
    x = torch.randn(2, 3, cos.shape[0], head_dim)
    rotated = apply_rope(x, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    pair_norms = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731 - each pair is rotated on its own
    assert torch.allclose(pair_norms(rotated), pair_norms(x), atol=1e-5)
    assert torch.allclose(rotated[..., 0, :], x[..., 0, :])  # position (0, 0) is the identity


def test_rope_scores_depend_only_on_relative_position_along_one_axis():
    torch.manual_seed(0)
    head_dim = 16
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(q_pos, k_pos):
        positions = torch.tensor([q_pos, k_pos])
        cos, sin = rope_tables(positions, head_dim, 10000.0)
        rq = apply_rope(q.expand(2, -1), cos, sin)[0]
        rk = apply_rope(k.expand(2, -1), cos, sin)[1]
        return torch.dot(rq, rk)

    for axis in (0, 1):
        shift = [0, 0]
        shift[axis] = 7
        base = score([3, 5], [1, 2])
        moved = score([3 + shift[0], 5 + shift[1]], [1 + shift[0], 2 + shift[1]])
        assert torch.allclose(base, moved, atol=1e-4)
    assert not torch.allclose(score([3, 5], [1, 2]), score([3, 5], [2, 1]), atol=1e-3)


def test_first_half_of_pairs_encodes_rows_second_half_columns():
    head_dim = 8
    cos, sin = rope_tables(torch.tensor([[5, 0], [0, 5]]), head_dim, 10000.0)
    row_only, column_only = sin[0], sin[1]
    assert torch.all(row_only[2:] == 0) and torch.all(row_only[:2] != 0)
    assert torch.all(column_only[:2] == 0) and torch.all(column_only[2:] != 0)
    inv_freq = 10000.0 ** (-torch.arange(0, 4, 2) / 4)
    assert torch.allclose(row_only[:2], torch.sin(5 * inv_freq))


def test_rope_tables_are_cached_per_schedule_and_grid():
    rope = RotaryEmbedding2D(head_dim=8, base=10000.0)
    first = rope.tables([(1, 1), (2, 2)], (64, 64), "cpu")
    assert rope.tables([(1, 1), (2, 2)], (64, 64), "cpu")[0] is first[0]
    other = rope.tables([(1, 1), (2, 2)], (90, 45), "cpu")
    assert not torch.equal(other[0], first[0])
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding2D(head_dim=6, base=10000.0)


def test_block_causal_mask_semantics():
    schedule = [(1, 1), (2, 2), (3, 3)]
    scale = scale_index_per_token(schedule)
    assert scale.tolist() == [0] + [1] * 4 + [2] * 9
    mask = block_causal_mask(schedule)
    assert mask.shape == (14, 14) and mask.dtype == torch.bool
    for query in range(14):
        for key in range(14):
            assert bool(mask[query, key]) == bool(scale[key] <= scale[query])
    assert mask[1, 4] and not mask[1, 5]  # a scale sees all of itself but nothing finer
    assert mask[13].all() and mask[0].sum() == 1
