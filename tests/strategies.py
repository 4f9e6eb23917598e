"""Hypothesis strategies the backend round-trip tests share."""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["SCALAR_KEYS", "Number", "dump_sequences", "steps"]

Number = bool | int | float
SCALAR_KEYS = ["a", "train/loss", "rollout/ep rew.mean", "x-y"]
steps = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def dump_sequences(
    draw: st.DrawFn, numbers: st.SearchStrategy[Number]
) -> list[tuple[int, dict[str, Number]]]:
    """Up to 5 dumps of ``numbers`` under a few keys; steps repeat, go back and jump."""
    step = draw(steps)
    dumps = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        step = draw(st.one_of(st.just(step), steps, st.integers(step - 3, step + 3)))
        step = min(max(step, -(2**63)), 2**63 - 1)
        chosen = draw(st.lists(st.sampled_from(SCALAR_KEYS), min_size=1, unique=True))
        dumps.append((step, {key: draw(numbers) for key in chosen}))
    return dumps
