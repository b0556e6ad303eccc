"""Governed training over torch.distributed ranks (specs/distributed.md): 2 and 4 gloo ranks on the CPU,
spawned by the test, train one run that a single process replays bit for bit; a step where one rank's
shard has no example allowed into a band; a rank that trains on an unrecorded example, and a forged
per-rank record re-signed with the trainer's key, fail verification naming the step and the rank; a
refusal on one rank is a refusal on every rank; the shard rule's two implementations agree."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset

from gradledger.ledger.bundle import export_bundle
from gradledger.ledger.ledger import Ledger
from gradledger.training.dataset import commit_dataset, load_dataset
from gradledger.training.distributed import shard_sizes
from gradledger.training.policy import sign_policy
from gradledger.training.trainer import Governance
from helpers import policy_fields
from gradledger.verify import VerificationPolicy, Verifier
from gradledger.verify._internal.recipe import shard_sizes as verifier_shard_sizes
from test_trainer import MANIFESTS, POLICY, WORLD, X, Y, make_model, new_ledger
from test_verify_cli import write_bundle
from test_verify_structure import items_of, reseal

from gradledger.training.bands import sequential_bands

STEPS, EVERY = 6, 3
#: Three epochs of 240 examples in batches of 24 under a policy whose first rule routes the memorization
#: flags in force to the head only (specs/dynamics.md §2.4): the scans score examples from the second epoch on.
FLAG_POLICY = sign_policy({**policy_fields("digits-mem"), "rules": [
    {"name": "memorized", "match": {"memorized": True}, "profile": [1, 0, 0], "limits": [None, None, None]},
    *policy_fields("x")["rules"]], "monitors": {"memorization": {"fraction": 0.2, "min_trace": 2}}}, WORLD.root, 10)
FLAG_STEPS = 30
#: Explicit batches (order "explicit"): four steps' batches of 8, 9 (shards of 5 and 4), 8 and 6, repeated.
EXPLICIT = [list(range(0, 8)), list(range(100, 109)), list(range(50, 58))[::-1], [3, 3, 200, 201, 7, 9]]
#: Where such a run crashes: the resume at the checkpoint of step 21 re-routes most of the last epoch by flags.
FLAG_CRASH = 22
#: Past the first epoch of a DistributedSampler over 239 examples, 2 ranks of 16: 8 steps, the last padded.
SAMPLER_STEPS = 10


def _rank(rank: int, world: int, root: str, seq: int, per_rank: int, variant: str) -> None:
    """One rank of a governed run: the user's own loop on every rank; rank 0 writes the ledger."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{variant}", rank=rank, world_size=world)
    led = Ledger.open(Path(root) / "ledger", writable=rank == 0)
    outcome = "done"
    try:
        ds = load_dataset(led, seq)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = TensorDataset(X[:ds.count], Y[:ds.count])
        order, steps, sampler = "committed", STEPS, None
        if variant == "sampler":  # every rank's own DistributedSampler, shuffled, padded where W does not divide
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(data, shuffle=True, seed=5)
            loader = DataLoader(data, batch_size=per_rank, sampler=sampler)
            order, steps = "loader", SAMPLER_STEPS
        elif variant == "unequal":  # rank 1's sampler draws fewer examples at the second step
            loader = DataLoader(data, batch_size=8, sampler=list(range(rank * 40, rank * 40 + (16 if rank == 0 else 13))))
            order = "loader"
        else:
            loader = DataLoader(data, batch_size=per_rank)
        explicit = {}
        if variant.startswith("explicit"):  # the user's own list of step batches, every rank given it
            explicit = {"batches": EXPLICIT if variant == "explicit" or rank == 0 else EXPLICIT[::-1]}
        kinds = set(variant.split("+"))  # "flags+crash": a run under FLAG_POLICY that crashes
        policy = FLAG_POLICY if "flags" in kinds else POLICY
        if "flags" in kinds:
            steps = FLAG_STEPS
        run = Governance(led, WORLD.trainer, dataset=ds, policy=policy, layout=sequential_bands(model),
                         run_id="ddp", checkpoint_every=EVERY, seed=11, root_key=WORLD.root, order=order,
                         **explicit)
        if "resume" in kinds:  # the same run, continued from its last checkpoint by a fresh set of ranks
            gm, gopt, gloader = run.resume(model, opt, loader)
        else:
            gm, gopt, gloader = run.make_governed(model, opt, loader)
        gm.train()
        epoch = 0
        while run.step < steps:
            if sampler is not None:
                sampler.set_epoch(epoch)
            epoch += 1
            for x, y in gloader:
                if variant == "poison" and rank == 1 and run.step == 2:
                    # A hostile rank trains on inputs that are not the committed examples (after the step-0
                    # self-check), in place, so the governed model sees the batch it drew: nothing on the
                    # other ranks can see it, and rank 0 records the losses this rank reports.
                    x.add_(0.5)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(gm(x), y)
                loss.backward()
                if (variant == "clip" and rank == 1) or variant == "userclip":
                    torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
                if variant.startswith("lr") and rank == 1 and run.step == 2:
                    # Rank 1 alone changes its learning rate: its weights would leave rank 0's, whose record
                    # one process replays. With its clip ("lrclip") the step takes the second exchange.
                    for group in gopt.param_groups:
                        group["lr"] = 0.05
                if variant == "lrclip":
                    torch.nn.utils.clip_grad_norm_(gm.parameters(), 0.5)
                gopt.step()
                if "crash" in kinds and run.step == (FLAG_CRASH if "flags" in kinds else steps - 1):
                    # Every rank dies here, one step short and without closing: the ledger keeps what was
                    # committed (the checkpoint of step EVERY, once rank 0's recorder has committed it).
                    run._drain()
                    (Path(root) / f"rank{rank}.out").write_text("crashed")
                    os._exit(0)
                if run.step >= steps:
                    break
        run.close()
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank met
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        led.close()
        (Path(root) / f"rank{rank}.out").write_text(outcome)
        dist.destroy_process_group()
    # Seen here: about one rank process in fifteen aborts ("terminate called without an active exception")
    # in the interpreter's own teardown, after its work and the process group's are done; a plain gloo
    # script does not. Its outcome is written above; the process ends without that teardown.
    os._exit(0)


def _sum_rank(rank: int, root: str) -> None:
    """One of two gloo ranks: all_reduce of a tensor made to trip an order-sensitive sum (signed zeros,
    subnormals, values that cancel, every float32 exponent), against the rank-order sum g0 + g1."""
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-sum", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(0)
        n = 1 << 16
        base = [torch.randn(n, generator=g) * torch.exp2(torch.randint(-149, 127, (n,), generator=g).float())
                for _ in range(2)]
        special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
        mine = [torch.cat([b, special, special.flip(0)]) for b in base]
        want = mine[0] + mine[1]
        got = mine[rank].clone()
        dist.all_reduce(got)
        same = torch.equal(got.view(torch.int32), want.view(torch.int32))
        (Path(root) / f"sum{rank}.out").write_text("same" if same else "differs")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_two_gloo_ranks_all_reduce_to_the_rank_order_sum_bit_for_bit(tmp_path: Path) -> None:
    """Why two gloo ranks may reduce by all_reduce (distributed.GradientGather.sum_by_allreduce)."""
    mp.spawn(_sum_rank, args=(str(tmp_path),), nprocs=2, join=True)
    assert [(tmp_path / f"sum{r}.out").read_text() for r in range(2)] == ["same", "same"]


def _train(root: Path, world: int, per_rank: int = 16, variant: str = "honest", count: int = len(MANIFESTS)
           ) -> tuple[Path, list[str]]:
    led, _ = new_ledger(root / "ledger")
    ds = commit_dataset(led, MANIFESTS[:count], "digits-with-inputs", WORLD.trainer, inputs=X[:count])
    led.close()
    mp.spawn(_rank, args=(world, str(root), ds.seq, per_rank, variant), nprocs=world, join=True)
    outcomes = [(root / f"rank{r}.out").read_text() for r in range(world)]
    bundle = root / "run.glb"
    with Ledger.open(root / "ledger") as led:
        export_bundle(led, bundle, with_data=True)
    return bundle, outcomes


def _crash_then_resume(root: Path, per_rank: int, kind: str = "",
                       after_crash: Callable[[Ledger], None] | None = None) -> Path:
    """A 2-rank run (``kind``: "" or "flags") that crashes short of its end without closing, then resumed
    by a fresh set of ranks to its end; ``after_crash`` reads the ledger between; the exported bundle."""
    led, _ = new_ledger(root / "ledger")
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    led.close()
    for stage in ("crash", "resume"):
        mp.spawn(_rank, args=(2, str(root), ds.seq, per_rank, f"{kind}+{stage}" if kind else stage), nprocs=2,
                 join=True)
        outcomes = [(root / f"rank{r}.out").read_text() for r in range(2)]
        assert outcomes == ["crashed" if stage == "crash" else "done"] * 2, outcomes
        if stage == "crash" and after_crash is not None:
            with Ledger.open(root / "ledger") as led:
                after_crash(led)
    with Ledger.open(root / "ledger") as led:
        export_bundle(led, root / "resumed.glb", with_data=True)
    return root / "resumed.glb"


def _verify(bundle: Path) -> Any:
    return Verifier([WORLD.root.public_key], VerificationPolicy()).verify(bundle)


def _updates(bundle: Path) -> list[dict[str, Any]]:
    return [it.body for it in _contents(bundle)[0] if it.type == "GovernedUpdate"]


def _contents(bundle: Path) -> tuple[list[Any], dict[bytes, bytes], str]:
    """A bundle's records (as items a hostile trainer edits and reseals), artifacts and origin."""
    from gradledger.ledger.bundle import Bundle

    with Bundle.open(bundle) as b:
        recs = [r for _, r in b.records()]
        return items_of(recs), {d: b.artifact(d) for d in b.artifact_digests()}, b.header["origin"]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return _train(tmp_path_factory.mktemp("ddp2"), 2, per_rank=4)


@pytest.mark.parametrize("world", [2, 4])
def test_a_run_over_ranks_replays_bit_for_bit_on_one_process(world: int, two: tuple[Path, list[str]],
                                                              tmp_path: Path) -> None:
    bundle, outcomes = two if world == 2 else _train(tmp_path, world)
    assert outcomes == ["done"] * world
    report = _verify(bundle)
    assert report.verified and report.replay_mode == "exact", report.render()
    updates = _updates(bundle)
    assert len(updates) == STEPS
    per_rank = 4 if world == 2 else 16
    for u in updates:
        assert u["recipe"]["ranks"] == shard_sizes(len(u["batch"]), world)
        assert len(u["recipe"]["losses"]) == world and len(u["batch"]) <= per_rank * world
    # Rank 0 wrote once per step: one RunStarted, and no record from another rank.
    assert sum(1 for u in updates if u["step"] == 0) == 1


def test_a_shard_with_no_example_allowed_into_a_band_keeps_every_gradient(two: tuple[Path, list[str]]) -> None:
    # Policy rule 1 (expert) is the only one that reaches the embedding band: a shard without one writes
    # nothing there, yet its rank still has that band's (zero) gradients, and the reduction goes through.
    bundle, _ = two
    reaches = {1}  # rule indices whose profile reaches band 2
    found = False
    for u in _updates(bundle):
        start = 0
        for size in u["recipe"]["ranks"]:
            rules = u["routing"]["rules"][start:start + size]
            found |= not any(r in reaches for r in rules)
            start += size
    assert found, "no step had a shard without an expert label; choose another seed"
    assert _verify(bundle).verified


def test_a_rank_training_on_an_unrecorded_example_fails_naming_step_and_rank(tmp_path: Path) -> None:
    bundle, outcomes = _train(tmp_path, 2, per_rank=4, variant="poison")
    assert outcomes == ["done", "done"]
    report = _verify(bundle)
    failure = report.first_failure
    assert failure is not None and failure.name == "replay" and failure.step == 2, report.render()
    assert "rank 1" in failure.detail, failure.detail


def test_a_forged_per_rank_loss_resigned_by_the_trainer_fails_naming_the_rank(two: tuple[Path, list[str]],
                                                                              tmp_path: Path) -> None:
    import struct

    items, arts, origin = _contents(two[0])
    seq = next(i for i, it in enumerate(items) if it.type == "GovernedUpdate" and it.body["step"] == 4)
    body = dict(items[seq].body)
    losses = bytearray(body["example_losses"])
    pos = body["recipe"]["ranks"][0] + 1  # the second example of rank 1's shard
    (value,) = struct.unpack_from("<f", losses, 4 * pos)
    struct.pack_into("<f", losses, 4 * pos, value * 0.5)
    items[seq].body = {**body, "example_losses": bytes(losses)}
    report = _verify(write_bundle(tmp_path / "forged.glb", reseal(items), arts, origin))
    failure = report.first_failure
    assert failure is not None and failure.name == "replay" and failure.seq == seq and failure.step == 4
    assert f"batch position {pos}, rank 1" in failure.detail, failure.detail


@pytest.mark.parametrize("forgery", ["uneven shards", "world", "no ranks", "ranks on one process"])
def test_forged_shards_or_world_fail_the_structural_checks(forgery: str, two: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    items, arts, origin = _contents(two[0])
    run = next(i for i, it in enumerate(items) if it.type == "RunStarted" and it.body["run_id"] == "ddp")
    seq = next(i for i, it in enumerate(items) if it.type == "GovernedUpdate" and it.body["step"] == 1)
    recipe = dict(items[seq].body["recipe"])
    if forgery == "uneven shards":  # the same examples, another cut between the ranks
        recipe["ranks"] = [recipe["ranks"][0] + 1, recipe["ranks"][1] - 1]
        items[seq].body = {**items[seq].body, "recipe": recipe}
    elif forgery == "world":  # the run claims 3 ranks
        settings = {**items[run].body["settings"], "distributed": {"world": 3, "backend": "gloo"}}
        items[run].body = {**items[run].body, "settings": settings}
    elif forgery == "no ranks":
        recipe.pop("ranks")
        recipe.pop("losses")
        items[seq].body = {**items[seq].body, "recipe": recipe}
        if not recipe:
            items[seq].body.pop("recipe")
    else:
        settings = {k: v for k, v in items[run].body["settings"].items() if k != "distributed"}
        items[run].body = {**items[run].body, "settings": settings}
    report = _verify(write_bundle(tmp_path / "forged.glb", reseal(items), arts, origin))
    failure = report.first_failure
    assert failure is not None and failure.name == "runs", report.render()
    assert "ranks" in failure.detail or "distributed" in failure.detail, failure.detail


def test_a_refusal_on_one_rank_is_a_refusal_on_every_rank(tmp_path: Path) -> None:
    _, outcomes = _train(tmp_path, 2, per_rank=4, variant="clip")  # rank 1 alone clips
    assert all("rank 1" in o and "clip" in o and "every rank runs one recipe" in o for o in outcomes), outcomes
    assert "(this rank)" in outcomes[1] and "(this rank)" not in outcomes[0]
    with Ledger.open(tmp_path / "ledger") as led:
        assert not led.by_type("GovernedUpdate") and not led.by_type("Checkpoint")  # nothing committed


@pytest.mark.parametrize("variant", ["lr", "lrclip"])
def test_a_learning_rate_changed_on_one_rank_is_refused_on_every_rank(variant: str, tmp_path: Path) -> None:
    _, outcomes = _train(tmp_path, 2, per_rank=4, variant=variant)
    assert all("step 2" in o and "rank 1" in o and "same hyper-parameters" in o for o in outcomes), outcomes
    assert "(this rank)" in outcomes[1] and "(this rank)" not in outcomes[0]
    with Ledger.open(tmp_path / "ledger") as led:
        assert all(u.body["step"] < 2 for u in led.by_type("GovernedUpdate"))  # the refused step left nothing


def test_every_ranks_own_distributed_sampler_is_recorded_padding_included_and_replays(tmp_path: Path) -> None:
    """order='loader' over ranks (specs/distributed.md §2): each rank's DistributedSampler draws its own shard;
    the step records their concatenation in rank order, the sampler's padding (a repeated example where 2
    ranks do not divide 239) included, and one process replays it bit for bit."""
    bundle, outcomes = _train(tmp_path, 2, per_rank=16, variant="sampler", count=239)
    assert outcomes == ["done", "done"], outcomes
    ups = _updates(bundle)
    assert len(ups) == SAMPLER_STEPS and [len(u["batch"]) for u in ups[:8]] == [32] * 7 + [16]
    first_epoch = [i for u in ups[:8] for i in u["batch"]]
    assert sorted(set(first_epoch)) == list(range(239)) and len(first_epoch) == 240  # one padded repeat
    assert first_epoch != sorted(first_epoch)  # the samplers' shuffle, not the committed order
    report = _verify(bundle)
    assert report.verified and report.verdict == "exact", report.render()


def test_a_run_over_ranks_routes_by_rank_0s_memorization_flags_and_replays(tmp_path: Path) -> None:
    """Rank 0 alone holds the losses; at each checkpoint its scan's flags reach every rank before the next
    draw, every rank routes its shard by them, and one process replays the run bit for bit."""
    bundle, outcomes = _train(tmp_path, 2, per_rank=12, variant="flags")
    assert outcomes == ["done", "done"], outcomes
    ups = _updates(bundle)
    assert len(ups) == FLAG_STEPS
    moved = [(u["step"], i) for u in ups for i, r in zip(u["batch"], u["routing"]["rules"]) if r == 0]
    assert moved and min(s for s, _ in moved) >= 2 * 10  # scored from the second epoch's scans on
    # every rank's shard took them: the memorized rule's examples lie in both halves of the batches
    halves = {u["batch"].index(i) * 2 // len(u["batch"]) for u in ups for s, i in moved if u["step"] == s}
    assert halves == {0, 1}
    report = _verify(bundle)
    assert report.verified and report.verdict == "exact", report.render()
    routing = next(c for c in report.checks if c.name == "routing")
    assert "memorization flags" in routing.detail


def test_a_run_over_ranks_under_flags_resumes_with_rank_0s_flags_of_its_checkpoint(tmp_path: Path) -> None:
    """A crash one step short; the resumed ranks route by the flags rank 0 recomputes from the losses it
    reads back, and every step after the resume is the uninterrupted run's, bit for bit."""
    honest, outcomes = _train(tmp_path / "honest", 2, per_rank=12, variant="flags")
    assert outcomes == ["done", "done"], outcomes
    (tmp_path / "crashed").mkdir()
    bundle = _crash_then_resume(tmp_path / "crashed", 12, "flags")
    resumed, want = _updates(bundle), _updates(honest)
    last = FLAG_CRASH // EVERY * EVERY  # the checkpoint resumed from
    assert any(r == 0 for u in resumed[last:] for r in u["routing"]["rules"])  # flags in force there
    fields = ("batch", "loss", "band_update_norms", "routing")
    assert [[u[f] for f in fields] for u in resumed] == [[u[f] for f in fields] for u in want]
    report = _verify(bundle)
    assert report.verified and report.replay_mode == "exact", report.render()


def test_explicit_batches_over_ranks_are_cut_into_shards_and_replay(tmp_path: Path) -> None:
    bundle, outcomes = _train(tmp_path / "same", 2, per_rank=4, variant="explicit")
    assert outcomes == ["done", "done"], outcomes
    ups = _updates(bundle)
    assert [u["batch"] for u in ups] == [EXPLICIT[s % len(EXPLICIT)] for s in range(STEPS)]
    assert ups[1]["recipe"]["ranks"] == [5, 4]
    report = _verify(bundle)
    assert report.verified and report.verdict == "exact", report.render()
    # ranks given other batches train other shards than the others' view of the step: every rank refuses
    # the first step, naming the rank that differs from its own view
    _, outcomes = _train(tmp_path / "other", 2, per_rank=4, variant="explicit-other")
    assert all(o.startswith("RankRefused: step 0: rank ") and "the run's shard" in o for o in outcomes), outcomes
    with Ledger.open(tmp_path / "other" / "ledger") as led:
        assert not led.by_type("GovernedUpdate")


def test_ranks_whose_loaders_draw_shards_of_other_sizes_refuse_the_step(tmp_path: Path) -> None:
    _, outcomes = _train(tmp_path, 2, per_rank=8, variant="unequal")
    assert all("drew [8, 5] examples" in o and "DistributedSampler" in o for o in outcomes), outcomes
    with Ledger.open(tmp_path / "ledger") as led:
        # the loop let the refusal end the run unclosed: it ends as after a crash, with what its checkpoints
        # had committed (nothing: the first step, where both drew 8, was never checkpointed)
        assert not led.by_type("GovernedUpdate")


def test_ddp_wrapping_is_refused_with_its_remedy(tmp_path: Path) -> None:
    led, _ = new_ledger(tmp_path / "ledger")
    ds = commit_dataset(led, MANIFESTS, "digits-with-inputs", WORLD.trainer, inputs=X)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model), run_id="r",
                     root_key=WORLD.root)
    wrapped = torch.nn.Module()
    wrapped.__class__ = torch.nn.parallel.DistributedDataParallel  # what DDP(model) is, without a process group
    with pytest.raises(Exception, match="not DistributedDataParallel"):
        run.make_governed(wrapped, opt, loader)
    led.close()


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 64), batch=st.integers(1, 4096))
def test_both_shard_rules_agree(world: int, batch: int) -> None:
    if batch < world:
        with pytest.raises(Exception, match="non-empty shards"):
            shard_sizes(batch, world)
        return
    sizes = shard_sizes(batch, world)
    assert sizes == verifier_shard_sizes(batch, world)
    assert sum(sizes) == batch and len(sizes) == world and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_the_users_clip_on_every_rank_clips_the_reduced_gradient_and_replays(tmp_path: Path) -> None:
    bundle, outcomes = _train(tmp_path, 2, per_rank=4, variant="userclip")
    assert outcomes == ["done"] * 2, outcomes
    updates = _updates(bundle)
    assert len(updates) == STEPS
    for u in updates:  # one clip, of the step's gradient (the shards' sum over the world), recorded with ranks
        clip = u["recipe"]["clip"]
        assert clip["kind"] == "norm" and clip["max_norm"] == 0.5 and u["recipe"]["ranks"] == [4, 4]
    assert any(u["recipe"]["clip"]["total_norm"] > 0.5 for u in updates)  # it did clip
    report = _verify(bundle)
    assert report.verified and report.replay_mode == "exact", report.render()
    # The hostile trainer (its key only, everything re-signed) claims a looser clip at step 2, or none:
    # replay clips the reduced gradient as recorded, and the weights it reaches are not the checkpoint's.
    for forged in ({**updates[2]["recipe"]["clip"], "max_norm": 1.0}, None):
        items, arts, origin = _contents(bundle)
        seq = next(i for i, it in enumerate(items) if it.type == "GovernedUpdate" and it.body["step"] == 2)
        recipe = {k: v for k, v in items[seq].body["recipe"].items() if k != "clip"}
        if forged is not None:
            recipe["clip"] = forged
        items[seq].body = {**items[seq].body, "recipe": recipe}
        report = _verify(write_bundle(tmp_path / "forged.glb", reseal(items), arts, origin))
        failure = report.first_failure
        assert failure is not None and failure.name == "replay" and failure.step == 2, report.render()


def test_a_run_over_ranks_that_crashed_resumes_over_ranks_to_the_same_weights(two: tuple[Path, list[str]],
                                                                              tmp_path: Path) -> None:
    def crashed(led: Ledger) -> None:  # the log ends at the step-EVERY checkpoint
        assert [led.observation(s).body["step"] for s in led.by_type("Checkpoint")] == [0, EVERY]

    bundle = _crash_then_resume(tmp_path, 4, after_crash=crashed)
    report = _verify(bundle)
    assert report.verified and report.replay_mode == "exact", report.render()
    # the interrupted run ends where the uninterrupted one did, bit for bit, step by step
    resumed, honest = _updates(bundle), _updates(two[0])
    assert [u["step"] for u in resumed] == list(range(STEPS))
    fields = ("batch", "loss", "band_update_norms", "recipe")
    for a, b in zip(resumed, honest):
        assert [a[f] for f in fields] == [b[f] for f in fields], a["step"]


def test_a_run_over_ranks_resumed_over_another_world_size_is_refused(two: tuple[Path, list[str]],
                                                                     tmp_path: Path) -> None:
    import shutil

    shutil.copytree(two[0].parent / "ledger", tmp_path / "ledger")
    led = Ledger.open(tmp_path / "ledger", writable=True)
    try:
        ds = load_dataset(led, led.by_type("DatasetCommitted")[-1])
        model = make_model()
        run = Governance(led, WORLD.trainer, dataset=ds, policy=POLICY, layout=sequential_bands(model),
                         run_id="ddp", checkpoint_every=EVERY, seed=11, root_key=WORLD.root)
        with pytest.raises(Exception, match="recorded over 2 rank"):
            run.resume(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                       DataLoader(TensorDataset(X, Y), batch_size=8))
    finally:
        led.close()


def test_unlearning_a_run_over_ranks_replays_its_shards_and_the_certificate_verifies(tmp_path: Path) -> None:
    from gradledger.training.retirement import retire
    from gradledger.training.unlearning import unlearn
    from helpers import CROWD_KEY

    _train(tmp_path, 2, per_rank=4)
    with Ledger.open(tmp_path / "ledger", writable=True) as led:
        retire(led, "worker-1", CROWD_KEY, "second opinions disagree")
        result = unlearn(led, "worker-1", WORLD.trainer, run_id="ddp")
        branch = [led.observation(s).body for s in led.by_type("GovernedUpdate") if s > result.branch_seq]
        export_bundle(led, tmp_path / "unlearned.glb", with_data=True)
    assert result.replayed_steps > 0 and branch
    for u in branch:  # the branch's steps are shards of what is left, reduced as the run reduced them
        assert u["recipe"]["ranks"] == shard_sizes(len(u["batch"]), 2)
    report = _verify(tmp_path / "unlearned.glb")
    assert report.verified and report.replay_mode == "exact", report.render()
    assert any(c["status"] == "pass" for c in report.certificates)
