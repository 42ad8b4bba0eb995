"""Several processes (gloo on CPU): the same training as one process with the same global
batch, every process's bank identical after each epoch, kill-and-resume under 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from instret.config import TrainConfig
from instret.data import load_folder
from instret.distributed import SINGLE, GlobalBatchNorm, World, process_group, world_from_env
from instret.run import resolve
from instret.trainer import Trainer, load_checkpoint
from tests.conftest import make_image_folder

EPOCHS = 2


def test_rows_split_a_batch_in_order_with_sizes_within_one():
    for n in range(1, 30):
        for size in range(1, 5):
            slices = [World(r, size).rows(n) for r in range(size)]
            covered = [i for s in slices for i in range(n)[s]]
            lengths = [s.stop - s.start for s in slices]
            assert covered == list(range(n)) and max(lengths) - min(lengths) <= 1


def test_global_batch_norm_without_other_processes_is_batch_norm():
    torch.manual_seed(0)
    plain, glob = torch.nn.BatchNorm2d(5), GlobalBatchNorm(5)
    x = torch.randn(6, 5, 4, 4) * 3 + 1
    assert torch.allclose(plain(x), glob(x)) and torch.allclose(plain.running_var, glob.running_var)


def _join(rank, size, tmp) -> World:
    """Join a gloo group through a file in tmp (no port to pick, so none to lose to a race);
    process_group() then leaves the group as it is and only ends it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=size)
    return world_from_env()


def _bn_rank(rank, size, tmp):
    world = _join(rank, size, tmp)
    with process_group(world, torch.device("cpu")):
        x, w = torch.load(f"{tmp}/bn_inputs.pt", weights_only=True)
        mine = world.rows(len(x))
        bn = GlobalBatchNorm(x.shape[1])
        xr = x[mine].clone().requires_grad_()
        (bn(xr) * w[mine]).sum().backward()
        torch.save(
            {"x_grad": xr.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad, "running_var": bn.running_var},
            f"{tmp}/bn_rank{rank}.pt",
        )
    # Everything is written and the group is gone. torch's gloo, after an autograd all_reduce,
    # sometimes aborts at interpreter exit ("terminate called without an active exception", one
    # run in six on 2 cores); leave without C++'s static destructors, which this test is not about.
    os._exit(0)


def _close_rank(rank, size, tmp):
    world = _join(rank, size, tmp)
    with process_group(world, torch.device("cpu")):
        torch.distributed.all_reduce(torch.ones(3))  # a last collective, then rank 0 works alone
        if world.main:
            time.sleep(1.5)
        (tmp / f"closing{rank}").write_text(str(time.time()))
    (tmp / f"closed{rank}").write_text(str(time.time()))


def test_no_process_leaves_the_group_before_every_process_has_reached_its_end(tmp_path):
    mp.start_processes(_close_rank, args=(2, tmp_path), nprocs=2, start_method="spawn")  # raises if one aborted
    rank0_done = float((tmp_path / "closing0").read_text())
    assert float((tmp_path / "closing1").read_text()) < rank0_done  # rank 1 got there first
    assert float((tmp_path / "closed1").read_text()) >= rank0_done  # and waited for rank 0


def test_global_batch_norm_forward_and_backward_equal_batch_norm_of_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, 4, generator=g) * 2 + 0.5  # 7 rows: split 4 / 3
    w = torch.randn(7, 3, 4, 4, generator=g)
    torch.save((x, w), tmp_path / "bn_inputs.pt")
    mp.start_processes(_bn_rank, args=(2, tmp_path), nprocs=2, start_method="spawn")
    bn = torch.nn.BatchNorm2d(3)
    xf = x.clone().requires_grad_()
    (bn(xf) * w).sum().backward()
    r0, r1 = (torch.load(tmp_path / f"bn_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.allclose(torch.cat([r0["x_grad"], r1["x_grad"]]), xf.grad, atol=1e-5)
    assert torch.allclose(r0["w_grad"] + r1["w_grad"], bn.weight.grad, atol=1e-5)  # DDP sums (then averages)
    assert torch.allclose(r0["b_grad"] + r1["b_grad"], bn.bias.grad, atol=1e-5)
    assert torch.allclose(r0["running_var"], bn.running_var) and torch.equal(r0["running_var"], r1["running_var"])


def _config(folder, loss):
    return TrainConfig(
        data=str(folder),
        epochs=EPOCHS,
        image_size=16,
        batch_size=10,
        knn_k=5,
        workers=0,
        loss=loss,
        nce_k=16,
        arch="small",
        out="unused",
    )


def _train_and_record(folder, loss, world, record, stream=False) -> None:
    """Train EPOCHS epochs with Trainer in this process; record[epoch] = bank after it."""
    cfg = resolve(_config(folder, loss), torch.device("cpu"))
    data = load_folder(folder, 16, stream=stream, world=world)
    assert len(data.train) == 63 and [p for p, _ in data.train.skipped] == [str(folder / "red" / "005b.png")]
    trainer = Trainer(cfg, data, torch.device("cpu"), world=world)
    for epoch in range(EPOCHS):
        trainer.train_epoch()
        record(epoch, trainer)


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}  # state_dict() shares the live tensors


def _rank_main(rank, size, folder, loss, tmp, stream):
    torch.set_num_threads(1)
    world = _join(rank, size, tmp)
    with process_group(world, torch.device("cpu")):
        _train_and_record(
            folder,
            loss,
            world,
            lambda e, t: torch.save(
                {"bank": t.bank.features.clone(), "model": _copy(t.model.state_dict())}, f"{tmp}/rank{rank}-epoch{e}.pt"
            ),
            stream,
        )


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("loss,stream", [("softmax", False), ("nce", False), ("softmax", True)])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, loss, stream):
    # 63 images, batch 10: the last batch (13) splits unevenly between the processes.
    # Streamed, each process checks half the files (an empty one among rank 1's is skipped
    # by both) and decodes only its own rows of each batch.
    folder = make_image_folder(tmp_path / "img", per_class=21, size=16)
    (folder / "red" / "005b.png").write_bytes(b"")
    mp.start_processes(_rank_main, args=(2, folder, loss, tmp_path, stream), nprocs=2, start_method="spawn")
    # "Float tolerance", measured: one process with 1 thread against 1 process with 2 threads
    # differs only by the order of float sums, and that difference grows with the steps.
    one = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        _train_and_record(
            folder,
            loss,
            SINGLE,
            lambda e, t, threads=threads: one.update(
                {(threads, e): {"bank": t.bank.features.clone(), **_copy(t.model.state_dict())}}
            ),
        )
    for epoch in range(EPOCHS):
        r0, r1 = (torch.load(tmp_path / f"rank{r}-epoch{epoch}.pt", weights_only=True) for r in (0, 1))
        assert torch.equal(r0["bank"], r1["bank"]), "the processes' banks drifted apart"
        assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
        two = {"bank": r0["bank"], **r0["model"]}
        floor = _max_diff(one[1, epoch], one[2, epoch])
        assert _max_diff(two, one[1, epoch]) <= 10 * floor + 1e-5, (epoch, _max_diff(two, one[1, epoch]), floor)


def _instret_2proc(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "instret", "train", "--nproc-per-node", "2", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_equals_uninterrupted(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=30, size=16)
    args = ["--data", folder, *"--epochs 4 --image-size 16 --batch-size 12 --knn-k 5 --workers 0".split()]
    ref = _instret_2proc(*args, "--out", tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    killed = _instret_2proc(*args, "--out", tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher and both training processes
    killed.wait()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] >= 2
    resumed = _instret_2proc("--out", tmp_path / "run", "--resume", "--workers", "0")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in ("ref", "run"))
    assert torch.allclose(a["bank"]["features"], b["bank"]["features"], atol=1e-6)
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert json.loads(resumed.stdout.read().decode().strip().splitlines()[-1])["epochs"] == 4


def test_a_user_error_under_two_processes_is_still_one_line(tmp_path):
    proc = _instret_2proc("--data", tmp_path / "missing", "--out", tmp_path / "run")
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read().decode().strip().splitlines()
    assert err == [f"instret: error: --data {tmp_path / 'missing'}: no such folder"], err
    assert not (tmp_path / "run").exists()


def test_process_groups_wait_longer_than_nccls_default_in_collectives(monkeypatch):
    # Rank 0 alone evaluates and indexes while the others wait at the close: NCCL's
    # default 10 minutes would abort the job. The group is made with a longer timeout.
    import torch.distributed as dist

    from instret import distributed

    made = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, timeout: made.update(backend=backend, timeout=timeout)
    )
    monkeypatch.setattr(distributed, "_wait_for_every_process", lambda world: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: made.clear())
    with distributed.process_group(distributed.World(0, 2, 0), torch.device("cpu")):
        assert made["backend"] == "gloo" and made["timeout"].total_seconds() >= 3600


def test_global_batch_norm_makes_no_tensor_from_host_values(tmp_path, monkeypatch):
    """One copy from the host per BatchNorm layer and step would stall a GPU 20-53 times a step."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        bn, plain = GlobalBatchNorm(3), torch.nn.BatchNorm2d(3)
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))

        def refuse(*args, **kwargs):
            raise AssertionError("torch.tensor called in forward")

        monkeypatch.setattr(torch, "tensor", refuse)
        assert torch.allclose(bn(x), plain(x), atol=1e-5)  # one process: plain BatchNorm
    finally:
        torch.distributed.destroy_process_group()
