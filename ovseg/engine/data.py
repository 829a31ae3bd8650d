"""A training data stream that can be stopped and resumed exactly.

Sample number `p` of a process's stream is fully determined by (seed, rank, p): which image it is (a fresh
permutation of the dataset per epoch, ranks interleaved, as detectron2's `TrainingSampler`) and every random
augmentation applied to it (the mapper runs with `random`, numpy and torch seeded from (seed, rank, p), the caller's
RNG states left untouched). Batches are formed in the main process from positions alone (with aspect-ratio grouping,
by the width / height the dataset records before mapping), so the whole batch sequence is a function of the seed.
The data workers then hold no state worth saving: a checkpoint stores the number of batches delivered, and a resumed
stream replays the batch formation (cheap: no image is read) and goes on from there, with any number of workers.
"""
import contextlib
import copy
import random
from typing import Callable, Dict, Iterator, List, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata

__all__ = ["ResumableTrainLoader", "capture_rng_state", "restore_rng_state", "preserved_rng"]

def capture_rng_state(cuda: bool = True) -> Dict:
    """The global RNG states of torch (CPU, and CUDA when `cuda` and available), numpy and `random`, as tensors and
    plain lists (so that a checkpoint holding them loads with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Run the block without changing the caller's CPU RNG states (torch, numpy, random). CUDA's are not touched:
    data workers are forked and must not initialise CUDA."""
    state = capture_rng_state(cuda=False)
    try:
        yield
    finally:
        restore_rng_state(state)


def _seeded(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class _StreamOrder:
    """Which image sits at a process's stream position: epoch e of the global stream is a permutation seeded by
    (seed, e); process `rank` of `world_size` takes global positions rank, rank + world_size, ..."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self._epoch, self._perm = -1, None

    def global_position(self, pos: int) -> int:
        return pos * self.world_size + self.rank

    def image_index(self, pos: int) -> int:
        g = self.global_position(pos)
        epoch = g // self.n
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_seeded(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm[g % self.n]


class _PositionDataset(torchdata.Dataset):
    """Item `p`: the mapped sample at stream position p, its randomness seeded by (seed, global position)."""

    def __init__(self, dicts: Sequence[dict], mapper: Callable, order: _StreamOrder):
        self.dicts, self.mapper, self.order = dicts, mapper, order

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, pos: int) -> dict:
        index, g = self.order.image_index(pos), self.order.global_position(pos)
        for attempt in range(100):
            with preserved_rng():
                s = _seeded(self.order.seed, g, attempt)
                random.seed(s)
                np.random.seed(s % 2**32)
                torch.default_generator.manual_seed(s)  # CPU only: CUDA's generators are the model's
                out = self.mapper(copy.deepcopy(self.dicts[index]))
                if out is None:  # the mapper rejected the sample (e.g. a crop without objects): another, seeded
                    index = random.randrange(len(self.dicts))
            if out is not None:
                return out
        raise RuntimeError(f"the training mapper rejected 100 samples in a row (stream position {pos})")


class _BatchSampler(torchdata.Sampler):
    """Infinite batches of stream positions, grouped by aspect (landscape / portrait) as detectron2's
    `AspectRatioGroupedDataset` does, the first `skip` batches left out (they were trained on before a resume)."""

    def __init__(self, landscape: List[bool], order: _StreamOrder, batch_size: int, grouping: bool):
        self.landscape, self.order, self.batch_size, self.grouping = landscape, order, batch_size, grouping
        self.skip = 0

    def __iter__(self) -> Iterator[List[int]]:
        buckets = {False: [], True: []}
        pos, formed = 0, 0
        while True:
            bucket = buckets[self.grouping and self.landscape[self.order.image_index(pos)]]
            bucket.append(pos)
            pos += 1
            if len(bucket) == self.batch_size:
                if formed >= self.skip:
                    yield list(bucket)
                formed += 1
                bucket.clear()


def _as_list(batch: List[dict]) -> List[dict]:
    return batch


class ResumableTrainLoader:
    """Iterable of training batches (lists of mapped dicts) with `state_dict` / `load_state_dict`, so that a
    checkpoint restores the exact rest of the stream (see the module docstring). Register it as a checkpointable."""

    def __init__(self, dicts: Sequence[dict], mapper: Callable, *, seed: int, total_batch_size: int, rank: int = 0,
                 world_size: int = 1, aspect_ratio_grouping: bool = True, num_workers: int = 0):
        if total_batch_size % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {total_batch_size} is not divisible by {world_size} processes")
        self._order = _StreamOrder(len(dicts), seed, rank, world_size)
        landscape = [d.get("width", 0) > d.get("height", 0) for d in dicts]
        self._sampler = _BatchSampler(landscape, self._order, total_batch_size // world_size, aspect_ratio_grouping)
        self._loader = torchdata.DataLoader(_PositionDataset(dicts, mapper, self._order), batch_sampler=self._sampler,
                                            num_workers=num_workers, collate_fn=_as_list)
        self._delivered = 0  # batches handed to the trainer
        self._started = False

    @property
    def seed(self) -> int:
        return self._order.seed

    def __iter__(self) -> Iterator[List[dict]]:
        self._sampler.skip = self._delivered
        self._started = True
        with preserved_rng():  # creating a DataLoader iterator draws from torch's RNG
            it = iter(self._loader)
        for batch in it:
            self._delivered += 1
            yield batch

    def state_dict(self) -> Dict:
        return {"seed": self.seed, "batches": self._delivered}

    def load_state_dict(self, state: Dict) -> None:
        if self._started:
            raise RuntimeError("load the data stream's state before iterating over it")
        self._order.seed = int(state["seed"])  # the resumed run continues the saved one's stream
        self._delivered = int(state["batches"])


def resolve_data_seed(cfg_seed: int) -> int:
    """SEED, or (SEED < 0) one random seed shared by all processes."""
    if cfg_seed >= 0:
        return cfg_seed
    from detectron2.utils.comm import shared_random_seed

    return int(shared_random_seed())


