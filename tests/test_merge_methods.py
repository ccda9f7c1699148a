"""MagMax and averaging against independent batch oracles, including exact ties and sign flips."""

import pytest
import torch

from clmerge.errors import UserError
from clmerge.merging.engine import merge_steps
from clmerge.merging.methods import get_method


def magmax_oracle(taus: list[torch.Tensor]) -> torch.Tensor:
    """Batch MagMax: stack, |.|, LAST index of the maximum."""
    stacked = torch.stack(taus)
    magnitude = stacked.abs()
    reversed_index = magnitude.flip(0).argmax(0)  # first max of the reversed stack = last max
    index = len(taus) - 1 - reversed_index
    return stacked.gather(0, index.unsqueeze(0)).squeeze(0)


def fold(method: str, taus: list[torch.Tensor]) -> list[torch.Tensor]:
    steps = merge_steps(lambda i: {"w": taus[i]}, len(taus), get_method(method))
    return [merged["w"] for _, merged in steps]


def test_magmax_ties_go_to_the_latest_task_and_keep_the_sign() -> None:
    taus = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-1.0, 2.0, 0.0, -1.0]),
            torch.tensor([0.5, -2.0, -0.0, 0.0])]
    merged = fold("magmax", taus)[-1]
    # entry 0: |1| = |-1| > |0.5| -> task 2 wins the tie: -1; entry 1: three-way tie -> task 3: -2
    assert merged.tolist() == [-1.0, -2.0, 0.0, 3.0]
    assert torch.equal(merged, magmax_oracle(taus))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magmax_fold_is_bit_identical_to_the_batch_oracle_at_every_step(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randint(-3, 4, (64, 9), generator=g).float() * 0.25 for _ in range(6)]
    for t, merged in enumerate(fold("magmax", taus), start=1):
        assert torch.equal(merged, magmax_oracle(taus[:t]))


def test_average_is_the_mean_of_the_task_vectors_after_every_step() -> None:
    g = torch.Generator().manual_seed(3)
    taus = [torch.randint(-8, 9, (5, 7), generator=g).float() for _ in range(4)]
    for t, merged in enumerate(fold("average", taus), start=1):
        expected = torch.stack(taus[:t]).sum(0) * (1.0 / t)
        assert torch.equal(merged, expected)
        assert torch.allclose(merged, torch.stack(taus[:t]).mean(0))


def test_yielded_steps_are_not_mutated_by_later_steps() -> None:
    taus = [torch.ones(3), 2 * torch.ones(3), 3 * torch.ones(3)]
    steps = fold("average", taus)
    assert [s[0].item() for s in steps] == [1.0, 1.5, 2.0]


def test_non_finite_task_vectors_are_rejected() -> None:
    with pytest.raises(UserError, match="non-finite"):
        fold("magmax", [torch.tensor([1.0]), torch.tensor([float("nan")])])


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(UserError, match="valid methods: magmax, average"):
        get_method("nope")
