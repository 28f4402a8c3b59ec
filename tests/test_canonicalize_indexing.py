"""Canonical indexing in simplify: constant gathers become Slices, a Slice between Transposes moves first.

Golden graphs for each rule (fires, refuses, the ``modified`` flag both ways, numerics equal in
onnxruntime), the exporters' two spellings of Falcon's key/value selection reaching one form,
the Slice bounds against numpy on random progressions, and each rule property-tested with
``ir.testing.rule_cases`` + ``check_rule``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ir
from ir.testing import check_rule, rule_cases
from passes import PassContext, PassManager
from passes.framework.match import const_array
from passes.cleanup._indexing_rules import (
    GATHER_ND_TO_GATHER, GATHER_TO_SLICE, SLICE_BETWEEN_TRANSPOSES, slice_bounds,
)

from conftest import lower_text as lower, op_types, run_ir  # noqa: E402

HEAD = '<ir_version: 10, opset_import: ["" : 17]>'


def simplify(model: ir.Model, ctx: PassContext | None = None) -> bool:
    records = PassManager("simplify,dead-flow", verify=True, check_modified=True).run(model, ctx or PassContext())
    return records[0].modified


def check(text: str, feeds: dict[str, np.ndarray], *, modified: bool) -> ir.Model:
    """Lower (with shapes inferred, as fold-constants leaves them) and simplify ``text``; outputs
    equal, names kept, a second run changes nothing."""
    m = lower(HEAD + text)
    ir.infer_shapes(m)
    expected = run_ir(m, feeds)
    names = [v.name for v in m.graph.outputs]
    assert simplify(m) is modified
    assert [v.name for v in m.graph.outputs] == names
    for a, b in zip(expected, run_ir(m, feeds), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert simplify(m) is False
    return m


def _x(*shape: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def test_gather_nd_of_constant_rows_is_a_gather_then_a_slice() -> None:
    m = check("""
        g (float[6, 3] x) => (float[2, 3] y, float[2, 3] z) <int64[2, 1] i = {4, 5}, int64[2, 1] j = {5, 0}> {
          y = GatherND(x, i)
          z = GatherND(x, j)
        }""", _x(6, 3), modified=True)
    # Rows 4, 5 are a range; rows 5, 0 are a Gather of axis 0.
    assert op_types(m) == ["Slice", "Gather"]
    assert m.graph.nodes[1].attr("axis") == 0


@pytest.mark.parametrize(("indices", "dims", "ops"), [
    ("{0, 2, 4}", "6", ["Slice"]),        # step 2
    ("{-2}", "6", ["Slice"]),             # made positive: [4:5]
    ("{-2}", "n", ["Slice"]),             # unknown size: [-2:-1]
    ("{-1}", "n", ["Slice"]),             # [-1:end]
    ("{-3, -2}", "n", ["Slice"]),
    ("{-1, 0}", "n", ["Gather"]),         # both signs, unknown size: which is first depends on it
    ("{-1, 0}", "6", ["Gather"]),         # 5, 0: decreasing
    ("{0, 2, 3}", "6", ["Gather"]),       # not a progression
    ("{1, 1}", "6", ["Gather"]),          # a repeat
])
def test_gather_of_a_constant_progression_is_a_slice(indices: str, dims: str, ops: list[str]) -> None:
    k = indices.count(",") + 1
    m = lower(HEAD + f"""
        g (float[2, {dims}, 3] x) => (float[2, {k}, 3] y) <int64[{k}] i = {indices}> {{
          y = Gather<axis = 1>(x, i)
        }}""")
    feeds = _x(2, 6, 3)
    expected = run_ir(m, feeds)[0]
    assert simplify(m) is (ops == ["Slice"])
    assert op_types(m) == ops
    np.testing.assert_array_equal(run_ir(m, feeds)[0], expected)


def test_scalar_gather_stays() -> None:
    # A 0-d index drops the axis: no Slice does that alone.
    check("""
        g (float[2, 6] x) => (float[2] y) <int64 i = {3}> {
          y = Gather<axis = 1>(x, i)
        }""", _x(2, 6), modified=False)


# Falcon's fused QKV [B, S, heads + 2, d]: the key is head -2, the value head -1.
FALCON_SCRIPT = """
    g (float[b, s, 6, 4] x) => (float[b, 1, s, 4] k, float[b, 1, s, 4] v) <int64[1] i = {-2}, int64[1] j = {-1}> {
      gk = Gather<axis = 2>(x, i)
      k = Transpose<perm = [0, 2, 1, 3]>(gk)
      gv = Gather<axis = 2>(x, j)
      v = Transpose<perm = [0, 2, 1, 3]>(gv)
    }"""
FALCON_DYNAMO = """
    g (float[b, s, 6, 4] x) => (float[b, 1, s, 4] k, float[b, 1, s, 4] v) <int64[1, 1] i = {-2}, int64[1, 1] j = {-1}> {
      t = Transpose<perm = [2, 0, 1, 3]>(x)
      gk = GatherND(t, i)
      k = Transpose<perm = [1, 0, 2, 3]>(gk)
      gv = GatherND(t, j)
      v = Transpose<perm = [1, 0, 2, 3]>(gv)
    }"""


def test_both_exporters_spellings_of_falcons_key_and_value_reach_one_form() -> None:
    feeds = _x(2, 3, 6, 4)
    forms = []
    for text in (FALCON_SCRIPT, FALCON_DYNAMO):
        m = check(text, feeds, modified=True)
        assert op_types(m) == ["Slice", "Transpose", "Slice", "Transpose"]
        forms.append([(n.op_type, n.attr("perm"), [const_array(i).tolist() for i in n.inputs[1:]])
                      for n in m.graph])
    assert forms[0] == forms[1]
    # Heads 4 and 5 of axis 2, then the one Transpose that both perms compose to.
    assert forms[0][0] == ("Slice", None, [[4], [5], [2], [1]]) and forms[0][1][1] == [0, 2, 1, 3]


def test_a_slice_between_transposes_that_compose_to_the_identity_leaves_one_slice() -> None:
    m = check("""
        g (float[2, 3, 4] x) => (float[2, 2, 4] y) <int64[1] s = {1}, int64[1] e = {3}, int64[1] a = {0}> {
          t = Transpose<perm = [1, 0, 2]>(x)
          c = Slice(t, s, e, a)
          y = Transpose<perm = [1, 0, 2]>(c)
        }""", _x(2, 3, 4), modified=True)
    assert op_types(m) == ["Slice"]


def test_an_inner_transpose_read_elsewhere_stays_for_that_reader() -> None:
    m = check("""
        g (float[2, 3, 4] x) => (float[2, 3, 4] y, float[3, 1, 4] z) <int64[1] s = {1}, int64[1] e = {2}> {
          t = Transpose<perm = [1, 0, 2]>(x)
          y = Relu(t)
          c = Slice(t, s, e)
          z = Transpose<perm = [1, 0, 2]>(c)
        }""", _x(2, 3, 4), modified=True)
    # The Slice moved first (axis 0 of t is axis 1 of x); the Relu still reads a Transpose of x.
    assert sorted(op_types(m)) == ["Relu", "Slice", "Transpose"]


def test_a_slice_after_one_transpose_stays() -> None:
    # Moving it would only move the Transpose: nothing composes.
    check("""
        g (float[2, 3, 4] x) => (float[2, 3, 1] y) <int64[1] s = {1}, int64[1] e = {2}, int64[1] a = {0}> {
          t = Transpose<perm = [2, 0, 1]>(x)
          c = Slice(t, s, e, a)
          y = Relu(c)
        }""", _x(2, 3, 4), modified=False)


def test_misses_are_not_near_misses() -> None:
    m = lower(HEAD + """
        g (float[2, 6] x) => (float[2, 3] y) <int64[3] i = {0, 2, 3}> {
          y = Gather<axis = 1>(x, i)
        }""")
    ctx = PassContext(explain=True)
    assert simplify(m, ctx) is False
    assert not ctx.diagnostics


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(1, 9), data=st.data())
def test_slice_bounds_take_what_the_gather_takes(dim: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(-dim, dim - 1))
    step = data.draw(st.integers(1, 4))
    picks = [i for i in range(start + dim if start < 0 else start, dim, step)]
    picks = picks[: data.draw(st.integers(1, len(picks)))]
    negative = data.draw(st.booleans())
    indices = np.array([i - dim if negative else i for i in picks])
    x = np.arange(dim)
    for known in (dim, "n"):
        bounds = slice_bounds(indices, known)
        assert not isinstance(bounds, str), bounds
        lo, hi, s = bounds
        assert x[lo:hi:s].tolist() == x[indices].tolist()


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@SETTINGS
@given(rule_cases(GATHER_ND_TO_GATHER, values={"indices": np.array([[[1], [0]], [[1], [1]]], np.int64)}))
def test_gather_nd_to_gather_properties(case) -> None:
    check_rule(GATHER_ND_TO_GATHER, case)


@SETTINGS
@given(st.sampled_from([(0, [1]), (1, [0, 1, 2]), (2, [1, 4, 7]), (-1, [-3, -2]), (-2, [-1])]).flatmap(
    lambda c: rule_cases(GATHER_TO_SLICE, attrs={"Gather": {"axis": c[0]}}, values={"indices": np.array(c[1])})))
def test_gather_to_slice_properties(case) -> None:
    check_rule(GATHER_TO_SLICE, case)


@SETTINGS
@given(st.sampled_from([[1, 0, 2], [2, 0, 1], [0, 2, 1]]).flatmap(lambda perm: rule_cases(
    SLICE_BETWEEN_TRANSPOSES, attrs={"Transpose": {"perm": perm}},
    values={"starts": np.array([1, 0]), "ends": np.array([2, -1]), "axes": np.array([-1, 1]),
            "steps": np.array([1, 2])})))
def test_slice_between_transposes_properties(case) -> None:
    check_rule(SLICE_BETWEEN_TRANSPOSES, case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_slice_between_any_two_transposes(data: st.DataObject) -> None:
    # rule_cases gives both Transposes one perm; here each has its own, and the Slice any axes.
    shape = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    r = len(shape)
    p1, p2 = (data.draw(st.permutations(range(r))) for _ in range(2))
    axes = data.draw(st.lists(st.integers(-r, r - 1), min_size=1, max_size=r, unique_by=lambda a: a % r))
    starts = [data.draw(st.integers(-4, 4)) for _ in axes]
    ends = [data.draw(st.integers(-4, 5)) for _ in axes]
    steps = [data.draw(st.sampled_from([1, 2, -1])) for _ in axes]
    ints = lambda v: ", ".join(map(str, v))  # noqa: E731
    n = len(axes)
    m = check(f"""
        g (float[{ints(shape)}] x) => (y)
          <int64[{n}] s = {{{ints(starts)}}}, int64[{n}] e = {{{ints(ends)}}}, int64[{n}] a = {{{ints(axes)}}},
           int64[{n}] st = {{{ints(steps)}}}> {{
          t = Transpose<perm = [{ints(p1)}]>(x)
          c = Slice(t, s, e, a, st)
          y = Transpose<perm = [{ints(p2)}]>(c)
        }}""", _x(*shape), modified=True)
    # One Transpose at most is left (none when the perms compose to the identity).
    assert sorted(op_types(m)) in (["Slice"], ["Slice", "Transpose"])


@pytest.mark.parametrize(("view", "select", "columns"), [
    ("2, 3, 6, 8", "q = Slice(v, four, five, two)", (32, 40)),          # Falcon: head 4 of 6, d = 8
    ("2, 3, 6, 8", "q = Slice(v, zero, mtwo, mtwo)", (0, 32)),          # the query heads, [..., :-2, :]
    ("2, 3, 3, 4, 4", "q = Slice(v, one, two, mthree)", (16, 32)),      # ModernBERT's unbind, axis -3 of 5
    ("2, 3, 3, 4, 4", "q = Gather<axis = -3>(v, one)", (16, 32)),
    ("2, 3, 3, 4, 4", "q = Slice(v, one, two, mtwo)", None),            # axis 3 is inside a block
])
def test_the_attention_matcher_reads_a_slice_of_the_block_axis_as_columns(view, select, columns) -> None:
    # What the canonical form is for: a Slice of whole blocks of a packed QKV view.
    from passes.fusions._attention_match import _head_blocks

    n = view.count(",") + 1
    m = lower(HEAD + f"""
        g (float[2, 3, 48] x) => (q) <int64[{n}] s = {{{view}}}, int64[1] zero = {{0}}, int64[1] one = {{1}},
          int64[1] two = {{2}}, int64[1] four = {{4}}, int64[1] five = {{5}}, int64[1] mtwo = {{-2}},
          int64[1] mthree = {{-3}}> {{
          v = Reshape(x, s)
          {select}
        }}""")
    ir.infer_shapes(m)
    got = _head_blocks(m.graph.nodes[1])
    assert (got[0][1] if got else None) == columns
    if got:
        assert got[1] is m.graph.nodes[0]
