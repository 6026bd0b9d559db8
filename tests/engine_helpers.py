"""A toy method and dataset for engine tests, importable by subprocesses (kill/resume, torchrun-style DDP)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from promptkd.backbones import load_backbone
from promptkd.engine import TrainConfig, Trainer
from promptkd.engine.distributed import DistInfo
from promptkd.methods.base import Batch, Method, MethodConfig, StepOutput
from promptkd.prompts import PromptedImageEncoder, VisualPrompts


@dataclass
class ToyConfig(MethodConfig):
    n_tokens: int = 2
    depth: int = 2
    nan_at_epoch: int = 0  # make the loss NaN from this epoch on (tests the guard)
    sleep: float = 0.0  # seconds per step, so a test can kill a subprocess mid-epoch


class ToyPrompted(Method):
    """Deep visual prompts + a linear head on a frozen tiny CLIP: enough to exercise every engine path."""

    name = "toy"
    config_class = ToyConfig

    def __init__(self, backbone, classnames, config=None):
        super().__init__(backbone, classnames, config)
        self.encoder = PromptedImageEncoder(backbone.model)
        gen = torch.Generator().manual_seed(0)
        self.learner.visual = VisualPrompts(self.config.n_tokens, self.config.depth, self.encoder.width, generator=gen)
        self.learner.head = nn.Linear(backbone.embed_dim, len(classnames))
        with torch.no_grad():
            self.learner.head.weight.copy_(torch.randn(len(classnames), backbone.embed_dim, generator=gen) * 0.1)
            self.learner.head.bias.zero_()
        self.epoch = 0

    def logits(self, images):
        return self.learner.head(self.encoder(images, self.learner.visual(), normalize=True))

    def training_step(self, batch: Batch) -> StepOutput:
        if self.config.sleep:
            time.sleep(self.config.sleep)
        loss = nn.functional.cross_entropy(self.logits(batch.images), batch.labels)
        if self.config.nan_at_epoch and self.epoch + 1 >= self.config.nan_at_epoch:
            loss = loss * float("nan")
        return StepOutput(loss, {"ce": float(loss.detach())})

    def on_epoch_end(self, epoch, total_epochs):
        self.epoch = epoch


class NoisyImages(torch.utils.data.Dataset):
    """Fixed images whose 'augmentation' draws from torch's global RNG, like torchvision transforms."""

    def __init__(self, n=24, classes=3, size=32):
        gen = torch.Generator().manual_seed(123)
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.labels = torch.arange(n) % classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] + 0.1 * torch.randn(self.images[i].shape), int(self.labels[i])


class ToyUnlabeled(ToyPrompted):
    """The toy without labels (like distillation): its logits regress a fixed random map of the image."""

    name = "toy_unlabeled"
    uses_labels = False

    def training_step(self, batch: Batch) -> StepOutput:
        if self.config.sleep:
            time.sleep(self.config.sleep)
        gen = torch.Generator().manual_seed(1)
        target_map = torch.randn(batch.images[0].numel(), len(self.classnames), generator=gen) / 30
        target = batch.images.flatten(1) @ target_map
        loss = nn.functional.mse_loss(self.logits(batch.images), target)
        return StepOutput(loss, {"mse": float(loss.detach())})


def make_shards(folder, n_shards=4, per_shard=6, size=32, seed=0, bad=()):
    """Tar shards of PNG members ``img_<shard>_<i>.png`` (plus a ``.cls`` member each, which readers ignore);
    ``bad`` lists (shard, i) members written as garbage bytes."""
    import io
    import tarfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
                data = b"not an image" if (s, i) in bad else buffer.getvalue()
                for name, payload in ((f"img_{s}_{i}.png", data), (f"img_{s}_{i}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def stream_source(shards, lanes=4, seed=3, **kwargs):
    from torchvision import transforms as T

    from promptkd.data.shards import ShardLanes
    from promptkd.engine.stream import StreamSource

    transform = T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.ToTensor()])
    return StreamSource(ShardLanes(shards, lanes=lanes, seed=seed), transform, seed=seed, **kwargs)


def train_stream(out, shards, epochs=3, info=None, method_config=None, lanes=4, **train_kwargs):
    torch.manual_seed(0)
    method = ToyUnlabeled(load_backbone("pkd-tiny"), ["a", "b", "c"], ToyConfig(**(method_config or {})))
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, seed=7, progress=False, log_every=1, **train_kwargs)
    source = stream_source(str(shards), lanes=lanes)
    result = Trainer(method, cfg, out, info=info).fit(source)
    return method, result


def make_method(**config):
    torch.manual_seed(0)
    backbone = load_backbone("pkd-tiny")
    return ToyPrompted(backbone, ["a", "b", "c"], ToyConfig(**config))


def train(out, epochs=3, info=None, method_config=None, **train_kwargs):
    method = make_method(**(method_config or {}))
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, seed=7, progress=False, log_every=1, **train_kwargs)
    result = Trainer(method, cfg, out, info=info).fit(NoisyImages(), NoisyImages(n=9))
    return method, result


def ddp_worker(rank, world_size, port, out, shards=None):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if shards is None:
            train(out, epochs=2, info=DistInfo(rank, world_size, rank))
        else:
            train_stream(out, shards, epochs=2, info=DistInfo(rank, world_size, rank))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # python engine_helpers.py OUT SLEEP [SHARDS]: a run a test can kill
    torch.set_num_threads(1)
    if len(sys.argv) > 3:  # a streamed run that writes its resume file every 2 steps
        sleep = {"sleep": float(sys.argv[2])}
        train_stream(sys.argv[1], sys.argv[3], epochs=3, method_config=sleep, checkpoint_every=2)
    else:
        train(sys.argv[1], epochs=4, method_config={"sleep": float(sys.argv[2])})
