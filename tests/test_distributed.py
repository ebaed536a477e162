"""verify_distributed on 2 gloo ranks (CPU, float64), spawned with torch.multiprocessing.

Each module-scoped fixture spawns the ranks once and runs a group of cases in them; the tests read
the pickled outcomes. Every spawn has a deadline and the process group a timeout, so a hang fails
the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from corpus import BUGS, CORRECT
from helpers import assert_unchanged, snapshot
from ranks import spawn_ranks
from tp_corpus import DDP_BUGS, DDP_CORRECT, TP_BUGS, TP_CORRECT, tp_mlp

from torchgradcheck import InvalidArgumentError, verify_distributed, verify_module

WORLD = 2
DEADLINE = 240.0  # seconds for one spawn (all its cases); a stuck collective fails sooner (PG_TIMEOUT)
PG_TIMEOUT = datetime.timedelta(seconds=60)  # a stuck collective raises instead of hanging

# --------------------------------------------------------------------------------------- harness


def _entry(rank: int, world: int, init: str, out: str, job: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=PG_TIMEOUT)
    try:
        result = JOBS[job](rank, world)
    finally:
        dist.destroy_process_group()
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def spawn(job: str, tmp: Path, world: int = WORLD, tries: int = 2) -> list[Any]:
    """Run ``JOBS[job](rank, world)`` on `world` gloo ranks; the per-rank return values, rank order."""
    return spawn_ranks(_entry, (job,), tmp, world, DEADLINE, tries)


def _changed(before: Any, model: torch.nn.Module) -> str:
    try:
        assert_unchanged(before, model)
    except AssertionError as exc:
        return str(exc)
    return ""


def _run(model, loss_fn, batch, **options) -> tuple[Any, str]:
    """(report or error text, what changed in the model)."""
    before = snapshot(model)
    try:
        report: Any = verify_distributed(model, loss_fn, batch, **options)
    except InvalidArgumentError as exc:
        report = f"InvalidArgumentError: {exc}"
    return report, _changed(before, model)


# ------------------------------------------------------------------------------------------ jobs


def job_tp(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for name, factory in {**TP_BUGS, **TP_CORRECT}.items():
        model, loss_fn, batch, placement = factory(rank, world)
        out[name] = _run(model, loss_fn, batch, placement=placement, inputs=True)
    model, loss_fn, batch, placement = TP_BUGS["missing_all_reduce_copy_backward"](rank, world)
    out["missing_all_reduce_copy_backward/params_only"] = _run(model, loss_fn, batch, placement=placement)
    return out


def job_ddp(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for name, factory in {**DDP_BUGS, **DDP_CORRECT}.items():
        model, loss_fn, batch, _ = factory(rank, world)
        out[name] = _run(model, loss_fn, batch)
    model, loss_fn, batch, _ = DDP_CORRECT["ddp_mlp"](rank, world)
    out["ddp_inputs"] = _run(model, loss_fn, batch, inputs=True)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))  # float32, checked in float64
    out["ddp_float32"] = _run(model, torch.nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))
    return out


SPLIT_CASES = {
    "one_element_wrong": BUGS["one_element_wrong"],
    "rounded_constant": BUGS["rounded_constant"],
    "cut_off": BUGS["cut_off"],
    "correct_mlp": CORRECT["correct_mlp"],
    "offset_loss": CORRECT["offset_loss"],
    "dropout_train": CORRECT["dropout_train"],
    "batchnorm_train": CORRECT["batchnorm_train"],
}


def _verdict(report: Any) -> dict[str, Any]:
    """What the comparison needs from a single-process report (kept small and picklable)."""
    return {
        "passed": report.passed,
        "evaluations": report.evaluations,
        "results": [(r.name, r.status, r.failed, r.worst[0].index if r.worst else None) for r in report.results],
    }


def job_split(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for name, factory in SPLIT_CASES.items():
        torch.manual_seed(0)  # the same model and batch on every rank
        model, loss_fn, batch = factory()
        report, changed = _run(model, loss_fn, batch, split=True, inputs=True)
        single = _verdict(verify_module(model, loss_fn, batch, inputs=True, mode="full")) if rank == 0 else None
        out[name] = (report, changed, single)
    torch.manual_seed(rank)  # a different model on every rank
    model, loss_fn, batch = CORRECT["correct_mlp"]()
    out["not_replicated"] = _run(model, loss_fn, batch, split=True)
    out["raises_on_rank1"] = _raises_on_rank1(rank)
    return out


class _FailsOnRank1(torch.nn.Linear):
    """A model whose own forward raises on rank 1 during the perturbed evaluations (grad off) only."""

    def forward(self, x):
        if dist.get_rank() == 1 and not torch.is_grad_enabled():
            raise RuntimeError("boom from the model on rank 1")
        return super().forward(x)


def _raises_on_rank1(rank: int) -> str:
    torch.manual_seed(0)
    model = _FailsOnRank1(3, 2)
    try:
        verify_distributed(model, torch.nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)), split=True)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def job_errors(rank: int, world: int) -> dict[str, Any]:
    model, loss_fn, batch, placement = tp_mlp(rank, world)
    return {
        "default_placement": _run(model, loss_fn, batch),
        "loss_not_replicated": _run(
            model, None, batch, placement=placement, forward=lambda m, b: torch.tanh(m.fc1(b[0])).pow(2).mean()
        ),
        "bad_placement_value": _run(model, loss_fn, batch, placement={"fc1.*": "split"}),
        "bad_placement_key": _run(model, loss_fn, batch, placement={"fc3.weight": "sharded"}),
        "split_with_placement": _run(model, loss_fn, batch, placement=placement, split=True),
    }


GROUPS = {"tp": job_tp, "ddp": job_ddp, "split": job_split, "errors": job_errors}


def job_all(rank: int, world: int) -> dict[str, Any]:
    """Every group in one spawn: starting the ranks (importing torch twice) costs more than the checks."""
    return {group: job(rank, world) for group, job in GROUPS.items()}


def job_abort_first_try(rank: int, world: int) -> int:
    """Rank 0 aborts in C++ on the first try (as gloo's teardown sometimes does), before its outcome."""
    mark = Path(os.environ["TORCHGRADCHECK_TEST_ABORT_MARK"])
    if rank == 0 and not mark.exists():
        mark.touch()
        os.abort()
    return rank


JOBS = {"all": job_all, "abort_first_try": job_abort_first_try, **GROUPS}


def test_spawn_tries_again_when_a_rank_aborts_before_its_outcome(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHGRADCHECK_TEST_ABORT_MARK", str(tmp_path / "aborted"))
    assert spawn("abort_first_try", tmp_path) == [0, 1]
    assert (tmp_path / "aborted").exists()
    assert not (tmp_path / "try0" / "rank0.pkl").exists()  # the first try aborted before its outcome
    (tmp_path / "aborted").unlink()
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):  # no second try left: the error
        spawn("abort_first_try", again, tries=1)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """``outcomes(group)``: the per-rank outcomes of one group; the ranks are spawned once per module."""
    ranks = spawn("all", tmp_path_factory.mktemp("ranks"))
    return lambda group: [rank[group] for rank in ranks]


def _same_on_every_rank(per_rank: list[tuple[Any, str]]) -> Any:
    """The report of rank 0, after checking every rank got the same verdict and left the model unchanged."""
    reports = [r for r, _ in per_rank]
    for rank, (_, changed) in enumerate(per_rank):
        assert not changed, f"rank {rank}: {changed}"
    assert not isinstance(reports[0], str), reports[0]
    assert all(str(r) == str(reports[0]) for r in reports[1:])
    return reports[0]


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TP_BUGS))
def test_verify_distributed_fails_planted_tp_bug(outcomes, case):
    report = _same_on_every_rank([rank[case] for rank in outcomes("tp")])
    assert not report.passed, report


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TP_CORRECT))
def test_verify_distributed_passes_correct_tp_model(outcomes, case):
    report = _same_on_every_rank([rank[case] for rank in outcomes("tp")])
    assert report.passed, report
    assert "objective: the replicated loss" in str(report)
    names = {r.name for r in report.results}
    if case == "sharded_input":
        assert names >= {"rank0:fc.weight", "rank1:fc.weight", "rank0:batch[0]", "rank1:batch[0]", "fc.bias"}
    else:
        assert names >= {"rank0:fc1.weight", "rank1:fc1.weight", "fc2.bias", "batch[0]"}


@pytest.mark.slow
def test_verify_distributed_missing_copy_all_reduce_shows_only_in_input_gradient(outcomes):
    ranks = outcomes("tp")
    with_inputs = _same_on_every_rank([r["missing_all_reduce_copy_backward"] for r in ranks])
    params_only = _same_on_every_rank([r["missing_all_reduce_copy_backward/params_only"] for r in ranks])
    assert [f.name for f in with_inputs.failures] == ["batch[0]"], with_inputs
    assert "differs across ranks" in with_inputs.failures[0].note
    assert params_only.passed, params_only


@pytest.mark.slow
def test_verify_distributed_spurious_reduce_all_reduce_doubles_gradients(outcomes):
    report = _same_on_every_rank([r["spurious_all_reduce_reduce_backward"] for r in outcomes("tp")])
    worst = report.failures[0].worst[0]
    assert worst.analytical == pytest.approx(WORLD * worst.numerical, rel=1e-6)
    assert {f.name for f in report.failures} >= {"rank0:fc1.weight", "rank1:fc2.weight", "batch[0]"}


@pytest.mark.slow
def test_verify_distributed_reports_divergent_replicated_gradient(outcomes):
    report = _same_on_every_rank([r["replicated_gain_not_reduced"] for r in outcomes("tp")])
    (gain,) = [r for r in report.results if r.name == "gain"]
    assert not gain.passed
    assert "differs across ranks" in gain.note
    assert [f.name for f in report.failures] == ["gain"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted({**DDP_BUGS, **DDP_CORRECT}))
def test_verify_distributed_ddp_compares_averaged_gradient_with_global_loss(outcomes, case):
    report = _same_on_every_rank([r[case] for r in outcomes("ddp")])
    assert report.passed == (case in DDP_CORRECT), report
    assert "mean over 2 ranks" in str(report)


@pytest.mark.slow
def test_verify_distributed_ddp_rejects_inputs(outcomes):
    for error, changed in (r["ddp_inputs"] for r in outcomes("ddp")):
        assert "DistributedDataParallel" in error, error
        assert "inputs=True" in error, error
        assert not changed


@pytest.mark.slow
def test_verify_distributed_ddp_rejects_model_in_another_dtype(outcomes):
    for error, changed in (r["ddp_float32"] for r in outcomes("ddp")):
        assert "DistributedDataParallel model has torch.float32 parameters, but dtype=torch.float64" in error, error
        assert "DDP(model.double())" in error, error
        assert not changed


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_verify_distributed_split_agrees_with_single_process(outcomes, case):
    ranks = outcomes("split")
    report = _same_on_every_rank([(r[case][0], r[case][1]) for r in ranks])
    single = ranks[0][case][2]
    assert report.passed == (case in CORRECT), report
    assert report.passed == single["passed"]
    assert len(report.results) == len(single["results"])
    for split_result, (name, status, failed, worst) in zip(report.results, single["results"]):
        assert (split_result.name, split_result.status, split_result.failed) == (name, status, failed)
        if failed:
            assert split_result.worst[0].index == worst
    per_rank = int(re.search(r"divided among 2 ranks \(at most ([0-9,]+) evaluations", str(report))[1].replace(",", ""))
    assert per_rank < single["evaluations"]


@pytest.mark.slow
def test_verify_distributed_split_rejects_model_that_differs_across_ranks(outcomes):
    for error, _ in (r["not_replicated"] for r in outcomes("split")):
        assert "split=True needs the same model and batch on every rank" in error


@pytest.mark.slow
def test_verify_distributed_lets_the_models_own_error_through_on_its_rank(outcomes):
    """As verify_module does: the failing rank gets the model's RuntimeError; the others are told which rank."""
    rank0, rank1 = (r["raises_on_rank1"] for r in outcomes("split"))
    assert rank1 == "RuntimeError: boom from the model on rank 1"
    assert rank0.startswith("RankError: verify_distributed(model, loss_fn, batch): on rank 1: RuntimeError: boom"), (
        rank0
    )


ERRORS = {
    "default_placement": re.escape("fc1.weight is replicated (the default placement) but its value differs across"),
    "loss_not_replicated": "the loss is not replicated",
    "bad_placement_value": r"placement\['fc1.\*'\]='split' is not a placement; valid options are",
    "bad_placement_key": "placement key 'fc3.weight' matches no parameter or input",
    "split_with_placement": "split=True is for a replicated model without collectives",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_verify_distributed_error_names_the_fix_on_every_rank(outcomes, case):
    for error, changed in (r[case] for r in outcomes("errors")):
        assert isinstance(error, str), error
        assert error.startswith("InvalidArgumentError: verify_distributed("), error
        assert re.search(ERRORS[case], error), error
        assert not changed, changed


def test_verify_distributed_needs_a_process_group():
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError, match=r"no torch.distributed process group is initialised; launch"):
        verify_distributed(model, torch.nn.MSELoss(), batch)
    assert_unchanged(before, model)
