"""Type allocation for a byte budget (`--target-size`, `--target-bpw`): which type each free
tensor gets so that the output fits and the summed estimated damage is least.

Pure: choices in, types out. Each tensor's choices are cut to their lower convex hull in
(bytes, damage); then every hull step, across all tensors, is taken in order of damage saved
per byte while it fits. For any Lagrange multiplier that is exactly the allocation minimising
damage + multiplier * bytes, and the bytes left below the budget go to the next steps that still
fit. Sizes are exact byte counts.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType as T

from nvfp4q.plan import Options, Step, TensorInfo, candidates, is_free, make_plan, plan_tensor
from nvfp4q.units import human_bytes


@dataclass(frozen=True)
class Choice:
    type: T
    nbytes: int  # what the tensor writes with this type, its sidecar included
    damage: float  # estimated share of the KLD (nvfp4q.damage)
    default: bool = False  # the type the plan gives without a budget: preferred on ties


def hull(choices: list[Choice]) -> list[Choice]:
    """The choices worth taking, cheapest first: no dominated one, and each step saving no more
    damage per byte than the one before (equal ratios keep the middle choice: it may be the default)."""
    out: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.nbytes, c.damage, not c.default)):
        if out and c.damage >= out[-1].damage:
            continue
        if out and c.nbytes == out[-1].nbytes:
            continue
        while len(out) >= 2 and _slope(out[-2], out[-1]) < _slope(out[-1], c):
            out.pop()
        out.append(c)
    return out


def _slope(a: Choice, b: Choice) -> float:
    """Damage saved per byte going from a to b, rounded so that equal ratios of different
    tensors compare equal."""
    return float(f"{(a.damage - b.damage) / (b.nbytes - a.nbytes):.12g}")


def reachable(choices: dict[str, list[Choice]]) -> tuple[int, int]:
    """Smallest and largest bytes the free tensors can take."""
    return (sum(min(c.nbytes for c in cs) for cs in choices.values()),
            sum(max(c.nbytes for c in cs) for cs in choices.values()))


def allocate(choices: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """The choice per tensor; ValueError when even the cheapest choices exceed the budget."""
    hulls = {name: hull(cs) for name, cs in choices.items()}
    pick = {name: h[0] for name, h in hulls.items()}
    spent = sum(c.nbytes for c in pick.values())
    if spent > budget:
        raise ValueError("budget below the smallest reachable size")
    order = {name: i for i, name in enumerate(hulls)}
    steps = [(a, b, name) for name, h in hulls.items() for a, b in zip(h, h[1:])]
    # on equal ratios: steps up to a tensor's default type first, so that a flat estimate keeps
    # today's layout; then the source order
    defaults = {name: next((c.nbytes for c in choices[name] if c.default), 0) for name in choices}
    steps.sort(key=lambda s: (-_slope(s[0], s[1]), s[1].nbytes > defaults[s[2]], order[s[2]]))
    for a, b, name in steps:
        if pick[name] is a and spent + b.nbytes - a.nbytes <= budget:
            pick[name] = b
            spent += b.nbytes - a.nbytes
    return pick


@dataclass(frozen=True)
class Allocation:
    target: int  # bytes of the output file, header included
    planned: int  # the output file's size, at most target
    damage: dict[str, float]  # estimated, per allocated tensor


def fit(tensors: list[TensorInfo], arch: str, opts: Options, target: int, header: int,
        cost: Callable[[Step], int], estimate: Callable[[TensorInfo, list[T]], dict[T, float]]
        ) -> tuple[list[Step], Allocation]:
    """The plan whose free tensors are allocated so that header + the steps' costs <= target.

    cost(step): the bytes a step adds to the output (its padded data, a sidecar's data and
    tensor info); estimate(tensor, types): damage per candidate type. ValueError for a target
    below the smallest reachable size.
    """
    base = make_plan(tensors, arch, opts)
    names = {t.name for t in tensors}

    def planned(t: TensorInfo, qtype: T) -> Step:
        has_bias = t.name.removesuffix(".weight") + ".bias" in names
        return plan_tensor(t, arch, replace(opts, allocated=((t.name, qtype),)), has_bias)

    choices = {}
    for st in base:
        if is_free(st.tensor, arch, opts):
            types = candidates(st.tensor)
            damage = estimate(st.tensor, types)
            choices[st.tensor.name] = [Choice(q, cost(planned(st.tensor, q)), damage[q], q == st.type) for q in types]
    fixed = header + sum(cost(st) for st in base if st.tensor.name not in choices)
    try:
        pick = allocate(choices, target - fixed)
    except ValueError:
        lo, hi = reachable(choices)
        raise ValueError(f"{human_bytes(target)} ({target} bytes) is below the smallest size reachable; "
                         f"reachable: {fixed + lo} to {fixed + hi} bytes ({human_bytes(fixed + lo)} to "
                         f"{human_bytes(fixed + hi)})") from None
    plan = make_plan(tensors, arch, replace(opts, allocated=tuple((n, c.type) for n, c in pick.items())))
    size = header + sum(cost(st) for st in plan)
    if size > target:  # a rescaled layer's norm turned F32: the allocation did not know
        raise ValueError(f"{human_bytes(target)}: the allocated plan takes {size} bytes; give a little more")
    return plan, Allocation(target, size, {n: c.damage for n, c in pick.items()})
