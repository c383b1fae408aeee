"""Data for the CL demo: shipped digits, IDX files, per-class splits, scenarios, permutations."""
import gzip
import struct

import numpy as np
import pytest
import torch

from mas_fast.cl.data import Digits, Splits, idx_mnist, load_splits, per_class_holdout, read_idx
from mas_fast.cl.scenarios import make_scenario, permutations


def write_idx(path, array):
    """An unsigned-byte IDX file (the MNIST format): magic, big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_mnist(n_per_class, seed):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n_per_class).astype(np.uint8)
    x = rng.integers(0, 256, size=(y.size, 28, 28), dtype=np.uint8)
    return x, y


def synthetic_splits(n_per_class=12):
    x, y = fake_mnist(n_per_class, 0)
    d = Digits(torch.from_numpy(x.reshape(len(y), -1)), torch.from_numpy(y.astype(np.int64)))
    return Splits(train=d, val=d, test=d, source="synthetic")


@pytest.fixture(scope="module")
def shipped():
    return load_splits()


def test_shipped_splits_are_disjoint_per_class_and_fixed(shipped):
    counts = {name: torch.bincount(getattr(shipped, name).y, minlength=10).tolist()
              for name in ("train", "val", "test")}
    assert counts == {"train": [360] * 10, "val": [40] * 10, "test": [100] * 10}
    rows = {name: {bytes(r) for r in getattr(shipped, name).x.numpy()} for name in ("train", "val", "test")}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"] and not rows["train"] & rows["val"]
    again = load_splits()
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).x, getattr(shipped, name).x)
    assert shipped.train.x.dtype == torch.uint8 and shipped.train.x.shape[1] == 784
    assert int(shipped.train.x.max()) > 200  # real pixel intensities, not [0, 1]


def test_per_class_holdout_partitions_every_class():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    kept, held = per_class_holdout(y, 0.2, seed=1)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(35))
    assert torch.bincount(y[held]).tolist() == [2, 4, 1]
    same = per_class_holdout(y, 0.2, seed=1)
    assert torch.equal(same[1], held)
    assert not torch.equal(per_class_holdout(y, 0.2, seed=2)[1], held)
    with pytest.raises(ValueError, match="fraction"):
        per_class_holdout(y, 1.0)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip_and_feed_the_splits(tmp_path, gz):
    ext = ".gz" if gz else ""
    x, y = fake_mnist(6, 1)
    xt, yt = fake_mnist(2, 2)
    write_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}"), x)
    write_idx(str(tmp_path / f"train-labels-idx1-ubyte{ext}"), y)
    write_idx(str(tmp_path / f"t10k-images-idx3-ubyte{ext}"), xt)
    write_idx(str(tmp_path / f"t10k-labels-idx1-ubyte{ext}"), yt)
    assert np.array_equal(read_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}")), x)
    train, test = idx_mnist(str(tmp_path))
    assert torch.equal(test.x, torch.from_numpy(xt.reshape(20, 784)))
    splits = load_splits(str(tmp_path))
    assert torch.equal(splits.test.y, torch.from_numpy(yt.astype(np.int64)))  # the official test set
    assert len(splits.train) + len(splits.val) == len(train) == 60
    assert torch.bincount(splits.val.y).tolist() == [1] * 10


def test_idx_without_test_files_holds_out_a_test_split(tmp_path):
    x, y = fake_mnist(10, 3)
    write_idx(str(tmp_path / "train-images.idx3-ubyte"), x)  # the dotted variant of the names
    write_idx(str(tmp_path / "train-labels.idx1-ubyte"), y)
    splits = load_splits(str(tmp_path))
    assert torch.bincount(splits.test.y).tolist() == [2] * 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == 100


def test_bad_idx_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_splits(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_splits(str(tmp_path))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="shape"):
        read_idx(str(short))


def test_split_scenarios_hold_digit_pairs():
    splits = synthetic_splits()
    task_il = make_scenario("split-task", splits, 5, seed=0)
    domain = make_scenario("split-domain", splits, 5, seed=0)
    assert all(c.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] for c in task_il.columns)
    assert all(c.tolist() == [[0, 1]] * 5 for c in domain.columns)
    assert len(task_il.columns) == len(domain.columns) == 5 and task_il.outputs == 10 and domain.outputs == 2
    for t, (a, b) in enumerate(zip(task_il.tasks, domain.tasks)):
        keep = (splits.train.y // 2) == t
        assert torch.equal(a.train.x, splits.train.x[keep]) and torch.equal(a.train.x, b.train.x)
        assert torch.equal(a.train.y, splits.train.y[keep] % 2) and torch.equal(a.train.y, b.train.y)
        assert a.train.task.unique().tolist() == [t]
    with pytest.raises(ValueError, match="tasks"):
        make_scenario("split-domain", splits, 6, seed=0)
    with pytest.raises(ValueError, match="unknown scenario"):
        make_scenario("split-mnist", splits, 2, seed=0)


def test_permutations_are_fixed_by_the_seed():
    splits = synthetic_splits()
    a, b, c = (make_scenario("permuted", splits, 4, seed=s) for s in (7, 7, 8))
    perms = permutations(4, 7)
    assert torch.equal(perms[0], torch.arange(784))
    assert all(torch.equal(p.sort().values, torch.arange(784)) for p in perms)
    for t in range(4):
        assert torch.equal(a.tasks[t].train.x, b.tasks[t].train.x)
        assert torch.equal(a.tasks[t].train.x, splits.train.x[:, perms[t]])
        assert torch.equal(a.tasks[t].eval.x, splits.test.x[:, perms[t]])
        assert torch.equal(a.tasks[t].train.y, splits.train.y)
    assert not torch.equal(a.tasks[1].train.x, c.tasks[1].train.x)
    assert [c.tolist() for c in a.columns] == [[list(range(10))] * 4] * 4 and a.outputs == 10


def test_validation_scenario_evaluates_on_validation_digits(shipped):
    s = make_scenario("split-domain", shipped, 2, seed=0, evaluate_on="val")
    assert len(s.tasks[0].eval) == 80
    with pytest.raises(ValueError, match="evaluate_on"):
        make_scenario("split-domain", shipped, 2, seed=0, evaluate_on="train")
