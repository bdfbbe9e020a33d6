"""PassManager: lint after each pass, name the failing pass, fixpoint with a bound."""
import pytest
import torch

import fxopt
from fxopt.graph_utils import op_name


def _gm():
    return fxopt.capture_function(lambda x: torch.relu(-(-x)) * 2, (torch.randn(4),))


class DropMetaPass(fxopt.Pass):
    """Inserts a node without meta['val']: the linter must catch it."""

    name = "drop_meta"

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.neg.default, (out.args[0][0],))
        return fxopt.PassResult(gm, True, {"matches": 1})


class BoomPass(fxopt.Pass):
    name = "boom"

    def call(self, gm):
        raise ValueError("kaput")


class NoopPass(fxopt.Pass):
    name = "noop"

    def __init__(self):
        self.calls = 0

    def call(self, gm):
        self.calls += 1
        return fxopt.PassResult(gm, False)


class OneAtATimePass(fxopt.Pass):
    """Removes one neg per call: needs several rounds to reach its fixpoint."""

    name = "one_neg"

    def call(self, gm):
        for n in gm.graph.nodes:
            if op_name(n) == "aten.neg.default":
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
                return fxopt.PassResult(gm, True, {"matches": 1})
        return fxopt.PassResult(gm, False)


def test_lint_failure_names_pass_and_predecessors():
    with pytest.raises(fxopt.PassError) as info:
        fxopt.PassManager([NoopPass(), DropMetaPass()]).run(_gm())
    err = info.value
    assert err.pass_name == "drop_meta" and err.predecessors == ("noop",)
    assert "meta['val']" in str(err) and "noop" in str(err)


def test_exception_in_pass_is_wrapped_with_its_name():
    with pytest.raises(fxopt.PassError, match="pass 'boom' failed with ValueError: kaput"):
        fxopt.PassManager([BoomPass()]).run(_gm())


def test_fixpoint_and_skip_of_clean_passes():
    noop = NoopPass()
    gm, report = fxopt.PassManager([OneAtATimePass(), noop], max_rounds=5).run(_gm())
    assert report.matches["one_neg"] == 2
    assert not any(op_name(n) == "aten.neg.default" for n in gm.graph.nodes)
    # noop ran in round 1 and 2 (graph changed in between) and in round 3 it was still
    # clean at the same graph version, so it was skipped.
    assert noop.calls == 2
    x = torch.randn(4)
    assert torch.equal(gm(x), torch.relu(x) * 2)


def test_round_bound_is_respected():
    gm, report = fxopt.PassManager([OneAtATimePass()], max_rounds=1).run(_gm())
    assert report.matches["one_neg"] == 1
    assert sum(op_name(n) == "aten.neg.default" for n in gm.graph.nodes) == 1


def test_pass_returning_wrong_type_is_reported():
    class Bad(fxopt.Pass):
        name = "bad"

        def call(self, gm):
            return gm

    with pytest.raises(fxopt.PassError, match="expected PassResult"):
        fxopt.PassManager([Bad()]).run(_gm())
