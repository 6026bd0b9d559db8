"""Streamed tar shards through the engine: lanes, rank/worker splits, exact resume, bad shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import make_shards, stream_source, train_stream
from promptkd.checkpoints import load_checkpoint
from promptkd.data.items import DataError
from promptkd.data.shards import ShardLanes, expand_shards
from promptkd.engine.stream import stream_batches

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, n_shards=4, per_shard=6)
    return folder / "shard-{000..003}.tar"


def _keys(batches, n):
    return [batch.keys for batch, _ in zip(batches, range(n))]


def test_lanes_interleave_every_sample_once_per_epoch_and_reach_any_position(shards):
    lanes = ShardLanes(str(shards), lanes=4, seed=1)
    assert lanes.total == 24 and [lanes.count(s) for s in range(4)] == [6] * 4
    streams = [lanes.lane(lane) for lane in range(4)]
    positions = [next(streams[p % 4]).key for p in range(48)]
    assert sorted(positions[:24]) == sorted(positions[24:])  # one epoch = every sample once, then again
    assert len(set(positions[:24])) == 24
    for lane in range(4):
        full = [s.key for s, _ in zip(lanes.lane(lane), range(15))]
        assert [s.key for s, _ in zip(lanes.lane(lane, start=7), range(8))] == full[7:]  # skips by headers
    two = ShardLanes(str(shards), lanes=2, seed=1)
    first = [s.key for s, _ in zip(two.lane(0), range(12))]
    assert {k.split("/")[0] for k in first} == {"shard-000.tar", "shard-002.tar"}  # lane 0 owns shards 0 and 2


def test_two_ranks_and_two_workers_split_without_overlap_and_rebuild_the_global_batches(shards):
    one = list(_keys(stream_batches(stream_source(str(shards)), batch_size=8), 6))
    ranks = [
        list(_keys(stream_batches(stream_source(str(shards)), batch_size=8, rank=r, world_size=2), 6)) for r in range(2)
    ]
    workers = list(_keys(stream_batches(stream_source(str(shards)), batch_size=8, num_workers=2), 6))
    assert workers == one
    for step in range(6):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one[step])  # the same global batch
        assert not set(ranks[0][step]) & set(ranks[1][step])
    shard_of = {r: {k.split("/")[0] for step in ranks[r] for k in step} for r in range(2)}
    assert not shard_of[0] & shard_of[1]  # ranks read disjoint shards
    epoch = [k for step in one[:3] for k in step]  # 3 steps x 8 = the 24 samples of an epoch
    assert len(epoch) == len(set(epoch)) == 24


def test_stream_resumes_at_any_position_with_the_same_images(shards):
    source = stream_source(str(shards))
    full = list(zip(stream_batches(source, batch_size=8), range(5)))
    later = list(zip(stream_batches(source, batch_size=8, start=2 * 8), range(3)))
    for (a, _), (b, _) in zip(full[2:], later):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.index, b.index)


@pytest.mark.parametrize(("start", "world_size"), [(3, 1), (5, 1), (5, 2), (6, 2)])
def test_resume_with_loader_workers_at_any_position_gives_the_uninterrupted_order(shards, start, world_size):
    batch = 2 * world_size if world_size > 1 else 3
    for rank in range(world_size):
        plain = stream_batches(
            stream_source(str(shards)), batch_size=batch, start=start, rank=rank, world_size=world_size
        )
        workers = stream_batches(
            stream_source(str(shards)), batch_size=batch, start=start, rank=rank, world_size=world_size, num_workers=2
        )
        expected = [b.index.tolist() for b, _ in zip(plain, range(3))]
        assert [b.index.tolist() for b, _ in zip(workers, range(3))] == expected, (start, rank)
        assert expected[0][0] == start + (rank - start) % world_size  # the rank's first position from the start


def test_lanes_must_divide_over_ranks_and_workers(shards):
    source = stream_source(str(shards), lanes=3)
    with pytest.raises(DataError, match="3 lanes cannot be split evenly over 2 processes"):
        next(stream_batches(source, batch_size=8, rank=0, world_size=2))
    with pytest.raises(DataError, match="5 lanes but only 4 shards"):
        ShardLanes(str(shards), lanes=5)


def test_bad_members_and_shards_are_named(tmp_path):
    make_shards(tmp_path / "bad", n_shards=2, per_shard=4, bad={(1, 2)})
    pattern = str(tmp_path / "bad" / "shard-{000..001}.tar")
    with pytest.raises(DataError, match=r"shard-001.tar:img_1_2.png: cannot decode image member"):
        list(_keys(stream_batches(stream_source(pattern, lanes=2), batch_size=4), 4))
    skipping = stream_source(pattern, lanes=2, skip_bad=True)
    got = list(_keys(stream_batches(skipping, batch_size=4), 2))
    assert sum(len(k) for k in got) == 7 and skipping.skipped == [f"{tmp_path}/bad/shard-001.tar:img_1_2.png"]

    whole = tmp_path / "bad" / "shard-000.tar"
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "shard-000.tar").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match=r"shard-000.tar: the tar shard is truncated or corrupt"):
        _ = ShardLanes(str(cut / "shard-000.tar")).total
    with pytest.raises(DataError, match="no tar shard matches the pattern"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="tar shard not found"):
        expand_shards(str(tmp_path / "bad" / "shard-{000..005}.tar"))


def test_compressed_shards_stream_like_plain_ones(shards, tmp_path):
    plain = expand_shards(str(shards))
    for path in plain:
        with tarfile.open(path) as src, tarfile.open(tmp_path / (Path(path).name + ".gz"), "w:gz") as dst:
            for member in src:
                dst.addfile(member, src.extractfile(member))
    gz = ShardLanes(str(tmp_path / "shard-*.tar.gz"), lanes=4, seed=1)
    ref = ShardLanes(str(shards), lanes=4, seed=1)
    for lane in range(4):
        a = [(s.key.replace(".tar.gz", ".tar"), s.data) for s, _ in zip(gz.lane(lane, start=3), range(5))]
        b = [(s.key, s.data) for s, _ in zip(ref.lane(lane, start=3), range(5))]
        assert a == b


def _gz_copies(plain: list[str], folder: Path) -> str:
    folder.mkdir(exist_ok=True)
    for path in plain:
        with tarfile.open(path) as src, tarfile.open(folder / (Path(path).name + ".gz"), "w:gz") as dst:
            for member in src:
                dst.addfile(member, src.extractfile(member))
    return str(folder / "shard-*.tar.gz")


def test_a_stream_from_the_start_counts_no_shard_and_a_resume_counts_only_what_it_skips(shards, tmp_path, monkeypatch):
    counted: list[int] = []
    real = ShardLanes.count
    monkeypatch.setattr(ShardLanes, "count", lambda self, shard: counted.append(shard) or real(self, shard))
    source = stream_source(_gz_copies(expand_shards(str(shards)), tmp_path / "gz"), epoch_samples=16)
    assert "images" not in source.summary()  # not counted: that would decompress every .tar.gz at start-up
    first = [b.keys for b, _ in zip(stream_batches(source, batch_size=8), range(2))]
    assert counted == []
    resumed = next(stream_batches(source, batch_size=8, start=8))
    assert resumed.keys == first[1]
    assert sorted(set(counted)) == [0, 1, 2, 3]  # position 8 = sample 2 of each lane: each lane's first shard counted
    assert stream_source(str(shards)).summary()["images"] == 24  # counted when the epoch needs it


def _rank_reads(rank: int, world_size: int, port: int, pattern: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        opened: set[int] = set()
        real = ShardLanes._members

        def members(self, shard, **kwargs):
            opened.add(shard)
            return real(self, shard, **kwargs)

        ShardLanes._members = members  # type: ignore[method-assign]
        source = stream_source(pattern)  # epoch_samples = every image: counted over the processes
        summary = source.summary()
        keys = [b.keys for b, _ in zip(stream_batches(source, batch_size=8, rank=rank, world_size=2), range(3))]
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"opened": sorted(opened), "summary": summary, "keys": keys})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_process_opens_only_its_own_shards_also_to_count_them(shards, tmp_path):
    import torch.multiprocessing as mp

    from test_engine import _free_port

    mp.spawn(_rank_reads, args=(2, _free_port(), str(shards), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["summary"]["images"] == ranks[1]["summary"]["images"] == 24
    assert ranks[0]["opened"] == [0, 2] and ranks[1]["opened"] == [1, 3]  # lanes 0, 2 and 1, 3
    one = list(_keys(stream_batches(stream_source(str(shards)), batch_size=8), 3))
    assert [sorted(a + b) for a, b in zip(ranks[0]["keys"], ranks[1]["keys"])] == [sorted(k) for k in one]


def test_trainer_trains_on_a_stream_and_is_bit_reproducible(shards, tmp_path):
    first, result = train_stream(tmp_path / "a", str(shards), epochs=2)
    second, _ = train_stream(tmp_path / "b", str(shards), epochs=2)
    assert result.epochs_run == 2 and len(result.history) == 2
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2 * 3  # 24 samples / batch 8
    for key, value in first.trainable_state().items():
        assert torch.equal(value, second.trainable_state()[key]), key


def test_resume_mid_epoch_from_a_step_checkpoint_equals_uninterrupted(shards, tmp_path):
    reference, _ = train_stream(tmp_path / "full", str(shards), epochs=3)
    # Stop after 2 epochs and 2 steps (a resume file every 2 steps), then finish in a new trainer.
    from promptkd.engine import trainer as engine

    calls = {"n": 0}
    real = engine.Trainer._save_resume

    def stop_after_step_checkpoint(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if kwargs.get("step"):
            calls["n"] += 1
            if calls["n"] == 3:  # epoch 1 step 2, epoch 2 step 2, epoch 3 step 2
                raise KeyboardInterrupt

    engine.Trainer._save_resume = stop_after_step_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stream(tmp_path / "cut", str(shards), epochs=3, checkpoint_every=2)
    finally:
        engine.Trainer._save_resume = real
    resumed, result = train_stream(tmp_path / "cut", str(shards), epochs=3, checkpoint_every=2)
    assert result.epochs_run == 1
    for key, value in reference.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[key]), key


def test_sized_dataset_resumes_mid_epoch_too(tmp_path):
    from engine_helpers import train
    from promptkd.engine import trainer as engine

    reference, _ = train(tmp_path / "full", epochs=2)
    real = engine.Trainer._save_resume

    def stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if kwargs.get("step") == 2 and args[0] == 1:
            raise KeyboardInterrupt

    engine.Trainer._save_resume = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "cut", epochs=2, checkpoint_every=1)
    finally:
        engine.Trainer._save_resume = real
    resumed, _ = train(tmp_path / "cut", epochs=2, checkpoint_every=1)
    for key, value in reference.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[key]), key


@pytest.mark.slow
def test_kill_during_a_streamed_epoch_and_resume_equals_uninterrupted(shards, tmp_path):
    reference, _ = train_stream(tmp_path / "full", str(shards), epochs=3, checkpoint_every=2)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(TESTS / "engine_helpers.py"), str(out), "0.15", str(shards)]
    process = subprocess.Popen(command, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").read_text().count("\n") < 4:
            assert process.poll() is None and time.time() < deadline, "training subprocess ended early"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # inside epoch 2 (3 steps of 0.15 s per epoch)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (out / "prompts.safetensors").exists()
    resumed, result = train_stream(out, str(shards), epochs=3, checkpoint_every=2, method_config={"sleep": 0.15})
    assert result.epochs_run < 3
    for key, value in reference.trainable_state().items():
        assert torch.equal(value, resumed.trainable_state()[key]), key


@pytest.mark.slow
def test_two_process_gloo_stream_equals_one_process(shards, tmp_path):
    import torch.multiprocessing as mp

    from engine_helpers import ddp_worker
    from test_engine import _free_port

    mp.spawn(ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(shards)), nprocs=2, join=True)
    single, _ = train_stream(tmp_path / "single", str(shards), epochs=2)
    tensors, _ = load_checkpoint(tmp_path / "ddp" / "prompts")
    for key, value in single.trainable_state().items():
        assert torch.allclose(tensors[key], value, atol=1e-5), key
