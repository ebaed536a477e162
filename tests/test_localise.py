"""Localisation: the module whose own backward is wrong is named; correct models name nothing."""

import pytest
import torch
from corpus import BUGS, CORRECT
from deep_corpus import DEEP, DeepNet, MySwish, _SwishFn
from helpers import assert_unchanged, snapshot
from torch import nn

from torchgradcheck import verify_module
from torchgradcheck._localise import Localisation, localise


@pytest.fixture(autouse=True)
def _one_thread():
    """Sites are tiny tensors: on a loaded 2-core machine, 2 intra-op threads made layer_norm 300x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _row(loc: Localisation, name: str):
    return next(s for s in loc.checked if s.name == name)


def _localise(model, loss_fn, batch, **kw) -> Localisation:
    before = snapshot(model)
    loc = localise(model, loss_fn, batch, **kw)
    assert_unchanged(before, model)
    return loc


@pytest.mark.parametrize("case", sorted(DEEP))
def test_localise_deep_model(case):
    model, loss_fn, batch, expected = DEEP[case]()
    loc = _localise(model, loss_fn, batch)
    assert loc.first_wrong == expected, loc
    wrong = [s.name for s in loc.checked if s.status == "wrong"]
    assert wrong == ([expected] if expected else []), loc
    # 8 blocks of fc, act, norm (and drop, unless an Identity), then the head; nearest the loss first;
    # when no leaf is wrong, the containers too (the model, the encoder, 8 blocks)
    dropout = "dropout" in case
    names = [s.name for s in loc.checked]
    leaves = [n for n in names if n.split(".")[-1] in ("head", "fc", "act", "norm", "drop")]
    assert leaves[:2] == ["head", "encoder.layers.7.drop" if dropout else "encoder.layers.7.norm"]
    assert leaves[-1] == "encoder.layers.0.fc"
    assert len(leaves) == (33 if dropout else 25)
    containers = ["(model)", "encoder", *(f"encoder.layers.{i}" for i in range(8))]
    assert sorted(set(names) - set(leaves)) == (sorted(containers) if expected is None else [])
    assert all(s.passed is not None for s in loc.checked), loc
    # cheap: each site a few dozen forwards of one small module (about 2,800-3,800 in all)
    assert all(0 < s.evaluations <= 400 for s in loc.checked), loc
    assert sum(s.evaluations for s in loc.checked) < 5_000


def test_verify_module_blames_every_parameter_upstream_of_a_wrong_activation():
    """The symptom localisation exists for: a parameter-free op makes the parameters before it fail."""
    model, loss_fn, batch, _ = DEEP["deep_buggy_activation"]()
    params = ["encoder.layers.0.fc.bias", "encoder.layers.2.norm.bias", "encoder.layers.5.fc.bias", "head.bias"]
    report = verify_module(model, loss_fn, batch, params=params, mode="full")
    failed = {r.name for r in report.failures}
    assert failed == {"encoder.layers.0.fc.bias", "encoder.layers.2.norm.bias"}, report


def test_localise_str_names_the_culprit():
    model, loss_fn, batch, _ = DEEP["deep_buggy_activation"]()
    text = str(_localise(model, loss_fn, batch))
    first, header = text.splitlines()[:2]
    assert first.startswith("first wrong backward: encoder.layers.3.act (MySwish): gradient of input[0] disagrees")
    assert header.split() == ["module", "type", "status", "rel.err", "wrong", "custom", "Function"]
    row = next(line for line in text.splitlines() if line.split()[0] == "encoder.layers.3.act")
    assert row.split()[1:3] == ["MySwish", "wrong"]
    assert row.split()[-1] == "_SwishFn"


def test_localise_correct_model_says_so():
    model, loss_fn, batch, _ = DEEP["deep_correct"]()
    loc = _localise(model, loss_fn, batch)
    assert str(loc).startswith("no wrong backward found: 35 module call(s) checked in isolation (")
    assert "every module checked computes its own gradients correctly" in loc.note
    assert max(s.relative_error for s in loc.checked) < 1e-8


# Planted bugs of the main corpus, with the module that holds each (None: not visible to localisation).
CORPUS_CULPRITS = {
    "one_element_wrong": ("0", ("weight",)),  # 1 % on 1 of 2,000 weights: seen along 16 directions
    "rounded_constant": ("(model)", ("fc.weight", "fc.bias")),  # custom Function in a non-leaf forward
    "tiny_gradients": ("0", ("weight",)),
    "doubling_hook": ("2", ("weight",)),  # a hook on a small parameter fires: its own Parameter is used
    "wrong_module_backward_hook": ("1", ("input[0]",)),
    "cut_off": ("(model)", ("all 4 tensors (jointly)",)),  # a .detach() in a container's forward: no leaf is wrong
}


def test_corpus_culprits_cover_every_bug():
    assert set(CORPUS_CULPRITS) == set(BUGS)


@pytest.mark.parametrize("case", sorted(CORPUS_CULPRITS))
def test_localise_corpus_bug(case):
    name, wrong = CORPUS_CULPRITS[case]
    loc = _localise(*BUGS[case]())
    assert loc.first_wrong == name, loc
    if name is not None:
        assert next(s for s in loc.checked if s.name == name).wrong == wrong


@pytest.mark.parametrize("case", sorted(CORRECT))
def test_localise_corpus_correct_model_names_nothing(case):
    loc = _localise(*CORRECT[case]())
    assert loc.first_wrong is None, loc
    assert not [s for s in loc.checked if s.status in ("wrong", "error")], loc


class _Twice(nn.Module):
    """One activation module called twice, an in-place ReLU, a keyword argument."""

    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.act = MySwish()
        self.gate = _Gate(bug)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.act(self.relu(self.gate(h, scale=h)))


class _GateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, bug):
        ctx.save_for_backward(x, s)
        ctx.bug = bug
        return x * torch.tanh(s)

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        gs = g * x * (1 - torch.tanh(s) ** 2)
        return g * torch.tanh(s), (0.5 * gs if ctx.bug else gs), None


class _Gate(nn.Module):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x, *, scale):
        return _GateFn.apply(x, scale, self.bug)


@pytest.mark.parametrize("bug", [False, True])
def test_localise_keyword_input_shared_module_and_inplace(bug):
    model = _Twice(bug)
    x = torch.randn(4, 5) + 0.1  # keep relu inputs off 0
    loc = _localise(model, lambda out: out.pow(2).sum(), x)
    # with no wrong leaf, the model itself (a container) is checked too, first in backward order
    assert [s.name for s in loc.checked] == ([] if bug else ["(model)"]) + ["act#2", "relu", "gate", "act", "fc"]
    assert loc.first_wrong == ("gate" if bug else None), loc
    assert _row(loc, "gate").wrong == (("kwargs['scale']",) if bug else ())


def test_localise_inputs_true_checks_the_first_module_input():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 3 * g

    class First(nn.Module):
        def forward(self, x):
            return Bad.apply(x)

    model = nn.Sequential(First(), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    loss_fn = lambda out: out.sum()  # noqa: E731
    assert _row(_localise(model, loss_fn, x), "0").status == "skipped"  # its input carries no gradient
    assert _localise(model, loss_fn, x, inputs=True).first_wrong == "0"


def test_localise_site_that_cannot_run_alone_is_an_error_row_not_a_crash():
    model = nn.Sequential(nn.Linear(3, 3), _OnlyOnce())
    loc = _localise(model, lambda out: out.sum(), torch.randn(2, 3))
    row = _row(loc, "1")
    assert (row.status, row.passed) == ("error", None)
    assert "RuntimeError: only once" in row.note
    assert "could not be run alone: " in loc.note
    assert _row(loc, "0").status == "ok"


class _OnlyOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("only once")
        return torch.tanh(x)


def test_localise_restores_model_when_the_forward_raises():
    model, x = DeepNet(depth=2), torch.randn(2, 12)
    before = snapshot(model)

    def boom(model, batch):
        model(batch)
        raise RuntimeError("boom")

    loc = localise(model, forward=boom, batch=x)
    assert loc.first_wrong is None
    assert loc.note.startswith("could not localise: the capture forward raised RuntimeError: boom")
    assert_unchanged(before, model)


def test_localise_batchnorm_train_leaves_running_stats_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), MySwish(bug=True), nn.Linear(6, 1)).train()
    loc = _localise(model, lambda out: out.sum(), torch.randn(8, 4))
    assert loc.first_wrong == "2"
    assert next(s for s in loc.checked if s.name == "1").status == "ok"


class _Container(nn.Module):
    """A non-leaf module that calls a custom Function in its own forward, around its children."""

    def __init__(self, own_bug: bool, child_bug: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = MySwish(bug=child_bug)
        self.own_bug = own_bug

    def forward(self, x):
        return _SwishFn.apply(self.inner(self.fc(x)), self.own_bug)


@pytest.mark.parametrize(
    ("own_bug", "child_bug", "expected"), [(True, False, "0"), (False, True, "0.inner"), (False, False, None)]
)
def test_localise_custom_function_in_a_container_forward(own_bug, child_bug, expected):
    model = nn.Sequential(_Container(own_bug, child_bug), nn.Linear(4, 2))
    loc = _localise(model, nn.MSELoss(), (torch.randn(5, 4), torch.randn(5, 2)))
    assert [(s.name, s.functions) for s in loc.checked if s.name != "(model)"] == [
        ("1", ()),
        ("0", ("_SwishFn",)),
        ("0.inner", ("_SwishFn",)),
        ("0.fc", ()),
    ]
    assert loc.first_wrong == expected, loc
    # a container around a wrong child fails too, but the blame goes to the child
    assert loc.checked[1].status == ("wrong" if own_bug or child_bug else "ok")


@pytest.mark.parametrize("case", ["deep_buggy_activation", "deep_correct"])
def test_localise_in_the_model_dtype(case):
    model, loss_fn, batch, expected = DEEP[case]()
    loc = _localise(model, loss_fn, batch, dtype=None)  # float32 throughout
    assert loc.first_wrong == expected, loc


def test_localise_large_sparse_embedding_checked_along_directions():
    """300 weights > max_elements: rebuilt from directions, through a sparse gradient."""
    model = nn.Sequential(nn.Embedding(50, 6, sparse=True), nn.Flatten(), nn.Linear(18, 2))
    loc = _localise(model, nn.MSELoss(), (torch.randint(0, 50, (4, 3)), torch.randn(4, 2)))
    assert loc.first_wrong is None, loc
    assert _row(loc, "0").status == "ok"


def test_localise_user_forward_hooks_run_once_per_site():
    """Inputs are captured before the user's pre-hooks, outputs after the user's forward hooks."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

    def pre(mod, args):
        assert args[0].dim() == 2, "pre-hook applied twice"
        return (2 * args[0].unsqueeze(0),)

    model[1].register_forward_pre_hook(pre)
    model[1].register_forward_hook(lambda mod, args, out: out.squeeze(0) ** 2)
    loc = _localise(model, lambda out: out.sum(), torch.randn(5, 3))
    assert loc.first_wrong is None, loc
    assert [s.status for s in loc.checked] == ["ok"] * 4, loc
    assert len(model[1]._forward_pre_hooks) == len(model[1]._forward_hooks) == 1


def test_verify_module_report_names_the_first_wrong_backward_only_on_failure():
    model, loss_fn, batch, culprit = DEEP["deep_buggy_activation"]()
    before = snapshot(model)
    report = verify_module(model, loss_fn, batch, mode="directional")
    assert not report.passed
    assert report.localisation.first_wrong == culprit
    assert f"first wrong backward: {culprit}" in str(report)
    assert report.to_dict()["localisation"]["first_wrong"] == culprit
    assert_unchanged(before, model)
    assert verify_module(model, loss_fn, batch, localise=False, mode="directional").localisation is None
    good, loss_fn, batch, _ = DEEP["deep_correct"]()
    assert verify_module(good, loss_fn, batch, mode="directional").localisation is None


def test_report_with_localisation_pickles():
    import pickle

    model, loss_fn, batch, culprit = DEEP["deep_buggy_activation"]()
    report = verify_module(model, loss_fn, batch, mode="sampled")
    again = pickle.loads(pickle.dumps(report))
    assert again.localisation.first_wrong == culprit == report.localisation.first_wrong
    assert str(again) == str(report)
