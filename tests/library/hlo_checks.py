"""Reading a compiled program's optimised HLO text, for the tests that check what XLA built
(the library's on the CPU, tests/benchmarks/test_aot.py's for H100 and TPU v5e)."""

from __future__ import annotations

import re


def instructions_of_shape(text: str, dims: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(dtype, opcode, first operand) of each instruction of the optimised HLO with result
    shape ``dims``."""
    shape = ",".join(map(str, dims))
    return re.findall(rf"= (\w+)\[{shape}\]\{{[^}}]*\}} ([a-z-]+)\(%?([\w.-]*)", text)


def assert_no_transposed_copy_of_w(text: str, v: int, d: int) -> None:
    """A program over ``w`` in the ``[V, D]`` layout holds no ``[D, V]`` array and no copy
    or transpose of ``w`` (while the pattern does match ``[V, D]`` instructions: w's
    gradient)."""
    assert instructions_of_shape(text, (d, v)) == []
    # (A copy of a broadcast zero, a loop's initial gradient accumulator, is not one of w.)
    copies = [
        i
        for i in instructions_of_shape(text, (v, d))
        if i[1] in ("copy", "transpose") and "broadcast" not in i[2]
    ]
    assert copies == []
    assert instructions_of_shape(text, (v, d))  # the pattern does match w's gradient


def largest_collective(text: str, opcodes: tuple[str, ...]) -> int:
    """Elements of the largest array among the results of the named collectives (e.g.
    ``("all-gather", "all-to-all")``, their async ``-start`` forms included) in an optimised
    HLO module; 0 when there is none."""
    names = "|".join(map(re.escape, opcodes))
    sizes = [0]
    for result in re.findall(rf"= (.*?) (?:{names})(?:-start)?\(", text):
        for dims in re.findall(r"\[([\d,]*)\]", result):
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            sizes.append(size)
    return max(sizes)
