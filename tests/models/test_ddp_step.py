"""The data-parallel step's arithmetic: two gloo ranks (spawned, loopback) against one process
learning the union of their samples. Kept apart from ``test_ddp.py`` so the spawned ranks import
torch and the models only (not MLflow or the broker client)."""

from __future__ import annotations

import numpy as np
import torch

from models import FeatureSpec, RankerTrain, build_batch, build_ranker
from models.distributed import (
    DistContext,
    loss_weight,
    placeholder_batch,
    snapshot_buffers,
    state_digest,
    sync_buffers,
)
from pipeline.broker import free_port
from tests.models.conftest import make_history

SPEC = FeatureSpec(seq_len=16, item_buckets=101, category_buckets=11)  # primes: no aliasing patterns
#: samples per rank and step: uneven, one rank empty in step 1 (placeholder), one sample in step 3
STEPS = [(5, 0), (3, 4), (1, 6)]


def _ranker(batch_free: bool):
    """``batch_free``: no layer that normalises by batch statistics (PReLU instead of Dice, no head
    BatchNorm) and no MBA-L2, so a data-parallel step must equal the single-process step on the union."""
    torch.manual_seed(0)
    if batch_free:
        return build_ranker("din", SPEC, short={"activation": "prelu"}, mba_l2=0.0,
                            over={"activation": "prelu", "input_norm": False})
    return build_ranker("din", SPEC)  # Dice, BatchNorm and MBA-L2 counts


def _step_data(step: int, rank: int):
    n = STEPS[step][rank]
    if n == 0:
        return None
    rng = np.random.default_rng(100 * step + rank)
    hs = [make_history(rng, int(k)) for k in rng.integers(0, 20, n)]  # (n,) jagged, some empty
    items = rng.integers(1, 200, n)
    return hs, items, items % 20, torch.tensor(rng.integers(0, 2, n), dtype=torch.float32)


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world=2, backend="gloo")
    result = {}
    for batch_free in (True, False):
        train = RankerTrain(_ranker(batch_free))
        ddp = ctx.wrap(train)
        opt = torch.optim.SGD(train.parameters(), lr=0.5)
        for step in range(len(STEPS)):
            data = _step_data(step, rank)
            counts = STEPS[step]
            if data is None:
                batch, labels = placeholder_batch(SPEC), torch.zeros(1)
            else:
                hs, items, cats, labels = data
                batch = build_batch(hs, items, cats, SPEC)
            before = snapshot_buffers(train)
            loss, _ = ddp(batch, labels)
            opt.zero_grad()
            (loss * loss_weight(counts, rank)).backward()
            opt.step()
            sync_buffers(ctx, train, before, counts[rank], sum(counts))
        result[batch_free] = {k: v.clone() for k, v in train.state_dict().items()}
    torch.save(result, out)
    dist.destroy_process_group()


def _single_process(batch_free: bool) -> dict[str, torch.Tensor]:
    train = RankerTrain(_ranker(batch_free))
    opt = torch.optim.SGD(train.parameters(), lr=0.5)
    for step in range(len(STEPS)):
        parts = [d for d in (_step_data(step, 0), _step_data(step, 1)) if d is not None]
        hs = [h for d in parts for h in d[0]]
        batch = build_batch(hs, np.concatenate([d[1] for d in parts]), np.concatenate([d[2] for d in parts]), SPEC)
        loss, _ = train(batch, torch.cat([d[3] for d in parts]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return train.state_dict()


def test_data_parallel_step_equals_one_process_on_the_union(tmp_path):
    """Uneven shares and a placeholder step: the loss weights make DDP's averaged gradient the
    union's mean-loss gradient (weights equal a single process's up to float summation order), both
    ranks end bit-identical, and the MBA-L2 id counts merge to exactly the single-process counts."""
    import torch.multiprocessing as mp

    outs = [str(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, port, outs[r])) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    r0, r1 = (torch.load(o, weights_only=True) for o in outs)
    for batch_free in (True, False):
        assert state_digest(r0[batch_free]) == state_digest(r1[batch_free])  # bit-identical ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: more threads only contend on a shared box
    try:
        ref, ref_counts = _single_process(True), _single_process(False)
    finally:
        torch.set_num_threads(threads)
    for name, value in ref.items():
        torch.testing.assert_close(r0[True][name], value, rtol=1e-5, atol=1e-6, msg=name)
    ref = ref_counts
    for name in ("item_counts", "category_counts"):
        assert torch.equal(r0[False][name], ref[name]), name
        assert ref[name].sum() > 0
