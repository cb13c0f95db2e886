"""adapt() and training under torch.distributed: two gloo ranks on CPU, checked against one process.

Each job runs real processes (spawned, `tcp://127.0.0.1` on a free port); a job that hangs fails
the test at a deadline instead of hanging the suite. Ranks report through files in `tmp_path`.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from unittest import mock
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import giva_fx
from giva_fx.distributed import DistributedError
from tests.models import CASES, FunctionalMLP

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORLD = 2
STEPS = 10
LR = 1e-2
DEADLINE_S = 180  # a whole job; the gloo timeout below fails a stuck collective well before it
FAIL_WITHIN_S = 10.0  # after one rank fails, every other rank must have raised within this


# ----------------------------------------------------------------------------- harness

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(job: Callable[[int, Path], dict[str, Any]], rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    result: dict[str, Any]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = job(rank, Path(out))
    except BaseException:
        result = {"crash": traceback.format_exc()}
    _report(Path(out), rank, result)
    dist.destroy_process_group()


def _report(out: Path, rank: int, result: dict[str, Any]) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def _launch(job: Callable[[int, Path], dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Run `job(rank, out)` on every rank; return each rank's result, failing on a crash or hang."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_main, args=(job, rank, port, str(out))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s"
    results = []
    for rank, p in enumerate(procs):
        path = out / f"rank{rank}.json"
        results.append({**(json.loads(path.read_text()) if path.exists() else {}), "exitcode": p.exitcode})
    crashes = [r["crash"] for r in results if "crash" in r]
    assert not crashes, "\n".join(crashes)
    return results


# ----------------------------------------------------------------------------- data

def _bert_batch(rank: int, j: int, size: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    """Rank `rank`'s j-th batch: different on every rank, reproducible by any process."""
    gen = torch.Generator().manual_seed(1000 + 100 * rank + j)
    ids = torch.randint(3, 96, (size, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 3, (size,), generator=gen)}


def _mlp_batch(rank: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + 100 * rank + j)
    return torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _concatenated(j: int) -> dict[str, torch.Tensor]:
    """The global batch j: every rank's batch j, concatenated in rank order."""
    parts = [_bert_batch(rank, j) for rank in range(WORLD)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _bases(adapted: giva_fx.GivaModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": getattr(a, k).detach().contiguous() for name, a in adapted.adapters().items() for k in "AB"}


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor]) -> list[float]:
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- jobs (run on every rank)

def _profile_and_train_job(rank: int, out: Path) -> dict[str, Any]:
    mlp, sample = CASES["functional_mlp"]()
    random_init = giva_fx.adapt(mlp, sample, rank=4, init="random", progress=False)
    safetensors.torch.save_file(_bases(random_init), str(out / f"random{rank}.safetensors"))

    uneven = giva_fx.adapt(mlp, [_mlp_batch(rank, j) for j in range(rank + 1)], rank=4, progress=False)
    safetensors.torch.save_file(_bases(uneven), str(out / f"uneven{rank}.safetensors"))

    model, _ = CASES["bert"]()
    adapted = giva_fx.adapt(model, [_bert_batch(rank, 0), _bert_batch(rank, 1)], rank=4, progress=False)
    safetensors.torch.save_file(_bases(adapted), str(out / f"bases{rank}.safetensors"))

    ddp = DistributedDataParallel(adapted)
    logged = ddp._get_ddp_logging_data()
    result: dict[str, Any] = {
        "reducer": {k: logged[k] for k in ("num_parameter_tensors", "total_parameter_size_bytes")}}
    vectors = giva_fx.trainable_parameters(adapted)
    _train(ddp, list(vectors.values()), _bert_batch(rank, 0))
    safetensors.torch.save_file({n: p.detach() for n, p in vectors.items()}, str(out / f"trained{rank}.safetensors"))

    with mock.patch.object(safetensors.torch, "save_file", wraps=safetensors.torch.save_file) as save_file:
        giva_fx.save_adapter(adapted, out / "adapter.safetensors")
    result["adapter_writes"] = save_file.call_count
    loaded = giva_fx.load_adapter(model, out / "adapter.safetensors", _bert_batch(rank, 0))
    result["loaded"] = [name for name, p in giva_fx.trainable_parameters(loaded).items()
                        if torch.equal(p, vectors[name])] == list(vectors)
    with torch.no_grad():
        loaded.eval(), adapted.eval()
        result["loaded_outputs"] = torch.equal(loaded(**_bert_batch(1, 1)).logits, adapted(**_bert_batch(1, 1)).logits)

    for case, call in {
        "seed": lambda: giva_fx.adapt(mlp, sample, rank=4, seed=rank, progress=False),
        "weights": lambda: giva_fx.adapt(_reseeded_mlp(rank), sample, rank=4, progress=False),
    }.items():
        try:
            call()
            result[case] = "no error"
        except giva_fx.ConfigError as exc:
            result[case] = str(exc)
    return result


def _reseeded_mlp(rank: int) -> torch.nn.Module:
    torch.manual_seed(rank)  # a model built without a shared seed: other weights on every rank
    return FunctionalMLP()


def _failure_job(rank: int, out: Path) -> dict[str, Any]:
    """Rank 1 fails before profiling (in capture, then in match), then in its loss on its second
    batch: first by raising, then by exiting outright."""
    model, sample = CASES["functional_mlp"]()
    result: dict[str, Any] = {}
    giva_fx.adapt(model, sample, rank=4, progress=False)  # the first capture is slow; this one also syncs ranks
    for stage, bad in (("capture", {"batches": (torch.randn(8, 7), sample[1])}),  # 7 features, not 12
                       ("match", {"targets": "no_such_weight*"})):
        options = {"batches": sample, "rank": 4, "progress": False, **(bad if rank == 1 else {})}
        if rank == 1:
            (out / f"failed_at_{stage}").write_text(str(time.time()))
        try:
            giva_fx.adapt(model, **options)
            result[stage] = {"error": None}
        except Exception as exc:
            result[stage] = {"error": type(exc).__name__, "message": str(exc), "at": time.time()}
        total = torch.ones(1)  # every rank joined the same collectives: the group still works
        dist.all_reduce(total)
        result[stage]["group_after"] = total.item()
    for scenario in ("raises", "exits"):
        calls = [0]

        def loss_fn(output: torch.Tensor, batch: Any) -> torch.Tensor:
            calls[0] += 1
            if rank == 1 and calls[0] == 2:
                (out / f"failed_at_{scenario}").write_text(str(time.time()))
                if scenario == "exits":
                    os._exit(3)
                raise ValueError("rank 1 cannot score this batch")
            return F.cross_entropy(output, batch[1])

        try:
            giva_fx.adapt(model, [sample] * 3, rank=4, loss_fn=loss_fn, progress=False)
            result[scenario] = {"error": None}
        except Exception as exc:  # what each rank raises is the result
            result[scenario] = {"error": type(exc).__name__, "message": str(exc), "at": time.time()}
        if scenario == "raises":  # every rank stopped at the same collective: the group still works
            try:  # a file stands where rank 0 must create the adapter's directory
                giva_fx.save_adapter(giva_fx.adapt(model, sample, rank=4, progress=False),
                                     out / "failed_at_raises" / "adapter.safetensors")
                result["save"] = None
            except Exception as exc:
                result["save"] = f"{type(exc).__name__}: {exc}"
            total = torch.ones(1)
            dist.all_reduce(total)
            result["group_after_failure"] = total.item()
            _report(out, rank, result)  # rank 1 exits in the next scenario
    return result


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("ddp")
    return _launch(_profile_and_train_job, out), out


def _load(out: Path, stem: str, rank: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / f"{stem}{rank}.safetensors"))


@pytest.mark.parametrize("stem", ["bases", "random", "uneven"])
def test_every_rank_ends_with_bit_identical_bases(trained, stem):
    _, out = trained
    first = _load(out, stem, 0)
    for rank in range(1, WORLD):
        other = _load(out, stem, rank)
        assert other.keys() == first.keys()
        for name, value in first.items():
            assert torch.equal(other[name], value), name


@pytest.fixture(scope="module")
def single() -> giva_fx.GivaModel:
    """One process adapting on the global batches: every rank's batches, concatenated."""
    model, _ = CASES["bert"]()
    return giva_fx.adapt(model, [_concatenated(0), _concatenated(1)], rank=4, progress=False)


def _assert_same_bases(ranks: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert ranks.keys() == ours.keys()
    for name, value in ours.items():
        if name.endswith(".B"):  # Vr: B comes from the per-op seed alone
            assert torch.equal(ranks[name], value), name
        else:  # A: singular vectors of the same gradient summed in another order, each defined up to sign
            sign = torch.sign((ranks[name] * value).sum(1, keepdim=True))
            torch.testing.assert_close(ranks[name] * sign, value, rtol=0, atol=1e-5, msg=name)


def test_bases_equal_those_of_one_process_on_the_concatenated_batches(trained, single):
    _, out = trained
    _assert_same_bases(_load(out, "bases", 0), _bases(single))


def test_ranks_with_unequal_batch_counts_average_over_all_batches(trained):
    _, out = trained
    mlp, _ = CASES["functional_mlp"]()
    everything = [_mlp_batch(rank, j) for rank in range(WORLD) for j in range(rank + 1)]
    _assert_same_bases(_load(out, "uneven", 0), _bases(giva_fx.adapt(mlp, everything, rank=4, progress=False)))


def test_random_bases_do_not_depend_on_the_process(trained):
    _, out = trained
    mlp, sample = CASES["functional_mlp"]()
    single = _bases(giva_fx.adapt(mlp, sample, rank=4, init="random", progress=False))
    ranks = _load(out, "random", 0)
    assert all(torch.equal(ranks[name], value) for name, value in single.items())


def test_ddp_synchronises_only_the_adapter_vectors(trained, single):
    results, _ = trained
    vectors = giva_fx.trainable_parameters(single)
    for result in results:
        assert result["reducer"] == {
            "num_parameter_tensors": len(vectors),
            "total_parameter_size_bytes": sum(p.numel() * p.element_size() for p in vectors.values()),
        }


def test_ddp_training_matches_one_process_on_the_concatenated_batch(trained, single):
    _, out = trained
    adapted = copy.deepcopy(single)
    ranks = _load(out, "bases", 0)
    for name, adapter in adapted.adapters().items():  # start from exactly the ranks' bases
        adapter.A.copy_(ranks[f"{name}.A"])
        adapter.B.copy_(ranks[f"{name}.B"])
    params = giva_fx.trainable_parameters(adapted)
    _train(adapted, list(params.values()), _concatenated(0))
    on_ranks = [_load(out, "trained", rank) for rank in range(WORLD)]
    for name, p in params.items():
        assert not torch.equal(p.detach(), torch.ones_like(p) if name.endswith("lambda_s") else torch.zeros_like(p))
        assert all(torch.equal(r[name], on_ranks[0][name]) for r in on_ranks), name
        torch.testing.assert_close(on_ranks[0][name], p.detach(), rtol=0, atol=1e-5, msg=name)


def test_save_adapter_writes_once_and_every_rank_loads_what_training_left(trained):
    results, out = trained
    assert [r["adapter_writes"] for r in results] == [1] + [0] * (WORLD - 1)
    assert (out / "adapter.safetensors").is_file()
    assert all(r["loaded"] and r["loaded_outputs"] for r in results)


def test_ranks_with_other_options_or_weights_refuse_to_profile(trained):
    results, _ = trained
    for result in results:
        assert "uses other options" in result["seed"] and "seed" in result["seed"]
        assert "weights or buffers differ between rank 1 and rank 0" in result["weights"]


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("failure")
    return _launch(_failure_job, out), out


def test_a_rank_that_raises_stops_every_rank_with_its_error(failed):
    (survivor, failing), out = failed
    assert failing["raises"]["error"] == "ValueError"
    assert survivor["raises"]["error"] == DistributedError.__name__
    assert "rank 1: ValueError: rank 1 cannot score this batch" in survivor["raises"]["message"]
    failed_at = float((out / "failed_at_raises").read_text())
    assert survivor["raises"]["at"] - failed_at < FAIL_WITHIN_S
    assert survivor["group_after_failure"] == failing["group_after_failure"] == WORLD


@pytest.mark.parametrize("stage, error, cause", [
    ("capture", "CaptureError", "torch.export could not capture FunctionalMLP"),
    ("match", "MatchError", "no op selected for adaptation (targets=('no_such_weight*',)"),
])
def test_a_rank_that_fails_before_profiling_stops_every_rank_at_the_preflight(failed, stage, error, cause):
    (survivor, failing), out = failed
    assert failing[stage]["error"] == error and failing[stage]["message"].startswith(cause)
    assert survivor[stage]["error"] == DistributedError.__name__
    assert f"rank 1: {error}: {cause}" in survivor[stage]["message"]
    assert survivor[stage]["at"] - float((out / f"failed_at_{stage}").read_text()) < FAIL_WITHIN_S
    assert survivor[stage]["group_after"] == failing[stage]["group_after"] == WORLD


def test_a_failed_adapter_write_on_rank_0_raises_on_every_rank(failed):
    (rank0, rank1), _ = failed
    assert rank0["save"].startswith(("FileExistsError", "NotADirectoryError"))
    assert rank1["save"].startswith("DistributedError: rank 0 failed to write")


def test_a_rank_that_dies_makes_the_others_raise_instead_of_hanging(failed):
    (survivor, failing), out = failed
    assert failing["exitcode"] == 3 and "exits" not in failing
    assert survivor["exits"]["error"] == DistributedError.__name__
    assert "another rank probably exited" in survivor["exits"]["message"]
    failed_at = float((out / "failed_at_exits").read_text())
    assert survivor["exits"]["at"] - failed_at < FAIL_WITHIN_S
