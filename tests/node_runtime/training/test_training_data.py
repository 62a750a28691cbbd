"""Datasets: the shipped and synthetic ones, user npz/csv within the operator's limits, and bad data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from node_runtime.training import JobError, run_training
from node_runtime.training.datasets import DATA_DIR, ArrayDataset, TextDataset, _split_text, load_dataset

Recorder = Any  # the conftest's Recorder, handed over by the ``recorder`` fixture
SpecFor = Callable[..., dict[str, Any]]
MLP = {"type": "mlp", "hidden": [16]}
TRANSFORMER = {"type": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1, "context": 64}
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # its README


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def separable(count: int = 200, features: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, features)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def test_digits_split_by_split_seed(spec_for: SpecFor) -> None:
    data = load_dataset(spec_for(MLP, "digits"))
    assert isinstance(data, ArrayDataset)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (1438, 359, 0)
    assert data.info["num_classes"] == 10 and data.info["image_shape"] == [1, 8, 8]
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    same = load_dataset(spec_for(MLP, "digits"))
    other = load_dataset(spec_for(MLP, {"name": "digits", "split_seed": 1}))
    assert isinstance(same, ArrayDataset) and isinstance(other, ArrayDataset)
    assert torch.equal(same.val_y, data.val_y) and not torch.equal(other.val_y, data.val_y)


def test_a_training_seed_sweep_keeps_the_split_and_shuffles_the_batches(spec_for: SpecFor) -> None:
    data, sweep = load_dataset(spec_for(MLP, "digits")), load_dataset(spec_for(MLP, "digits", seed=5))
    assert isinstance(data, ArrayDataset) and isinstance(sweep, ArrayDataset)
    assert torch.equal(sweep.val_x, data.val_x) and torch.equal(sweep.train_x, data.train_x)
    first_targets = [next(data.train_batches(seed, 0, 64))[1] for seed in (0, 5)]
    assert not torch.equal(*first_targets)  # the batch order is still the training seed's


def test_split_seed_zero_is_the_split_that_training_seed_zero_made_before(spec_for: SpecFor) -> None:
    """Results and checkpoints of earlier runs stay valid: the permutation that training.seed 0 drew."""
    with gzip.open(DATA_DIR / "digits.csv.gz", "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(table))
    for seed in (0, 3):
        data = load_dataset(spec_for(MLP, "digits", seed=seed))
        assert isinstance(data, ArrayDataset)
        assert torch.equal(data.val_x, torch.from_numpy(table[order[:359], :-1] / 16.0))
        assert torch.equal(data.train_x, torch.from_numpy(table[order[359:], :-1] / 16.0))  # in this order
        assert torch.equal(data.train_y, torch.from_numpy(table[order[359:], -1].astype(np.int64)))
    raw = (DATA_DIR / "tiny_text.txt").read_bytes()
    text = load_dataset(spec_for(TRANSFORMER, "tiny-text"))
    assert isinstance(text, TextDataset)
    split = len(raw) - int(len(raw) * 0.2)
    assert text.train_tokens.numpy().tobytes() == raw[:split] and text.val_tokens.numpy().tobytes() == raw[split:]


@pytest.mark.parametrize("dataset", [{"name": "blobs", "n_samples": 300, "n_features": 3, "n_classes": 4},
                                     {"name": "spirals", "n_samples": 300, "n_classes": 3}])
def test_synthetic_data_is_a_function_of_the_split_seed(spec_for: SpecFor, dataset: dict[str, Any]) -> None:
    first, again = load_dataset(spec_for(MLP, dataset)), load_dataset(spec_for(MLP, dataset, seed=7))
    other = load_dataset(spec_for(MLP, {**dataset, "split_seed": 7}))
    assert isinstance(first, ArrayDataset) and isinstance(other, ArrayDataset) and isinstance(again, ArrayDataset)
    assert torch.equal(first.train_x, again.train_x) and not torch.equal(first.train_x, other.train_x)
    assert len(first.train_x) + len(first.val_x) == 300
    assert set(first.train_y.tolist()) == set(range(dataset["n_classes"]))


def test_tiny_shakespeare_is_split_90_10_like_nanogpt(spec_for: SpecFor) -> None:
    data = load_dataset(spec_for(TRANSFORMER, "tiny-shakespeare"))
    assert isinstance(data, TextDataset) and data.info["vocab_size"] == 256
    assert (len(data.train_tokens), len(data.val_tokens), len(data.test_tokens)) == (1_003_855, 111_539, 0)
    text = data.train_tokens.numpy().tobytes() + data.val_tokens.numpy().tobytes()  # contiguous: train, then val
    assert hashlib.sha256(text).hexdigest() == TINY_SHAKESPEARE_SHA256
    assert text.startswith(b"First Citizen:\nBefore we proceed any further") and len(set(text)) == 65
    assert data.batches_per_epoch(12) == 1307  # nanoGPT's CPU setting: block 64, batch 12
    inputs, targets = next(data.val_batches(12))
    assert inputs.shape[1] == 64 and torch.equal(inputs[:, 1:], targets[:, :-1])


def test_test_fraction_holds_out_a_third_disjoint_split(spec_for: SpecFor, data_root: Path) -> None:
    count = 101
    (data_root / "ids.npz").write_bytes(npz_bytes(x=np.arange(count, dtype=np.float32)[:, None],
                                                  y=np.arange(count) % 2))  # each sample's x is its id
    held_out = {"url": "ids.npz", "test_fraction": 0.25, "split_seed": 4}
    data = load_dataset(spec_for(MLP, held_out), data_root)
    without = load_dataset(spec_for(MLP, {**held_out, "test_fraction": 0.0}), data_root)
    assert isinstance(data, ArrayDataset) and isinstance(without, ArrayDataset)
    ids = [set(part[:, 0].long().tolist()) for part in (data.train_x, data.val_x, data.test_x)]
    assert [len(part) for part in ids] == [56, 20, 25]  # round(101 x 0.2) and round(101 x 0.25)
    assert set().union(*ids) == set(range(count)) and sum(map(len, ids)) == count
    assert torch.equal(data.val_x, without.val_x)  # the test split comes after validation's samples
    batches = list(data.test_batches(8))
    assert torch.equal(torch.cat([x for x, _ in batches]), data.test_x)
    assert torch.equal(torch.cat([y for _, y in batches]), data.test_y)


def test_test_fraction_of_text_is_its_very_end(spec_for: SpecFor) -> None:
    raw = (DATA_DIR / "tiny_text.txt").read_bytes()
    data = load_dataset(spec_for(TRANSFORMER, {"name": "tiny-text", "val_fraction": 0.1, "test_fraction": 0.05}))
    assert isinstance(data, TextDataset)
    parts = [tokens.numpy().tobytes() for tokens in (data.train_tokens, data.val_tokens, data.test_tokens)]
    assert b"".join(parts) == raw
    assert [len(part) for part in parts] == [len(raw) - 19_572 - 9_786, 19_572, 9_786]
    windows = list(data.test_batches(4))
    assert windows and all(inputs.shape[1] == 64 and torch.equal(inputs[:, 1:], targets[:, :-1])
                           for inputs, targets in windows)
    assert sum(len(inputs) for inputs, _ in windows) == math.ceil((9_786 - 65) / 64)


@pytest.mark.parametrize(("model", "dataset"), [(MLP, "digits"), (MLP, "blobs"), (TRANSFORMER, "tiny-text"),
                                                (TRANSFORMER, "tiny-shakespeare")])
def test_no_test_split_by_default(spec_for: SpecFor, model: dict[str, Any], dataset: str) -> None:
    data = load_dataset(spec_for(model, dataset))
    assert list(data.test_batches(16)) == []
    held_out = data.test_tokens if isinstance(data, TextDataset) else data.test_x
    assert len(held_out) == 0


def test_datasets_built_without_test_tensors_have_no_test_batches() -> None:
    arrays = ArrayDataset({}, torch.zeros(4, 2), torch.zeros(4), torch.zeros(1, 2), torch.zeros(1))
    text = TextDataset({}, torch.zeros(100, dtype=torch.uint8), torch.zeros(30, dtype=torch.uint8), 8)
    assert list(arrays.test_batches(2)) == [] and list(text.test_batches(2)) == []


def test_splits_that_leave_too_little_data_are_job_errors(spec_for: SpecFor, data_root: Path) -> None:
    (data_root / "three.npz").write_bytes(npz_bytes(x=np.zeros((3, 2), dtype=np.float32), y=np.arange(3) % 2))
    with pytest.raises(JobError, match="dataset.test_fraction: 3 samples leave none to train on"):
        load_dataset(spec_for(MLP, {"url": "three.npz", "test_fraction": 0.5}), data_root)
    for fraction, size in ((1e-5, 1), (1e-7, 0)):  # a test split was asked for: it must hold a window
        with pytest.raises(JobError, match=f"dataset.test_fraction: the test split .{size} bytes. holds no window"):
            load_dataset(spec_for(TRANSFORMER, {"name": "tiny-text", "test_fraction": fraction}))
    with pytest.raises(JobError, match=r"model.context: the training split \(160 bytes\) is too short"):
        _split_text(bytes(200), {"val_fraction": 0.1, "test_fraction": 0.1}, 200)


def test_blobs_are_learnable(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    result = run_training(spec_for(MLP, {"name": "blobs", "n_classes": 3}, epochs=5, learning_rate=1e-2),
                          recorder().context())
    assert result.metrics["val_accuracy"] > 0.8


@pytest.mark.parametrize("url", ["plain.npz", "file://{root}/plain.npz", "{root}/plain.npz"])
def test_user_npz_under_the_data_root(recorder: Callable[..., Recorder], spec_for: SpecFor, data_root: Path,
                                      url: str) -> None:
    x, y = separable()
    (data_root / "plain.npz").write_bytes(npz_bytes(x=x, y=y))
    spec = spec_for(MLP, {"url": url.format(root=data_root)}, epochs=10, learning_rate=1e-2)
    result = run_training(spec, recorder().context(data_root=data_root))
    assert result.status == "completed" and result.metrics["val_accuracy"] > 0.9


def test_user_images_train_a_cnn(recorder: Callable[..., Recorder], spec_for: SpecFor, data_root: Path) -> None:
    x = np.random.default_rng(0).random((64, 6, 6), dtype=np.float32)  # (samples, height, width): one channel
    (data_root / "images.npz").write_bytes(npz_bytes(x=x, y=np.arange(64) % 3))
    result = run_training(spec_for({"type": "cnn", "channels": [4]}, {"url": "images.npz"}),
                          recorder().context(data_root=data_root))
    assert result.status == "completed"
    with pytest.raises(JobError, match="model.channels"):  # 6x6 halves to 3 then 1: a third pool cannot fit
        run_training(spec_for({"type": "cnn", "channels": [4, 4, 4]}, {"url": "images.npz"}),
                     recorder().context(data_root=data_root))


def test_csv_with_integer_targets_is_classification(recorder: Callable[..., Recorder], spec_for: SpecFor,
                                                    data_root: Path) -> None:
    x, y = separable()
    rows = ["f1,f2,f3,f4,label"] + [",".join([*map(str, features), str(label)])
                                    for features, label in zip(x, y, strict=True)]
    (data_root / "table.csv").write_text("\n".join(rows))
    result = run_training(spec_for(MLP, {"url": "table.csv"}, epochs=10, learning_rate=1e-2),
                          recorder().context(data_root=data_root))
    assert result.metrics["val_accuracy"] > 0.9


class _OneFile(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def http_dataset() -> Iterator[str]:
    """A dataset server on 127.0.0.2: loopback, so only reachable where the operator allows ``127.0.0.2/32``."""
    x, y = separable()
    _OneFile.body = npz_bytes(x=x, y=y)
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _OneFile)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}/data.npz"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_urls_only_when_the_operator_allows(recorder: Callable[..., Recorder], spec_for: SpecFor,
                                                 http_dataset: str) -> None:
    spec = spec_for(MLP, {"url": http_dataset})
    with pytest.raises(JobError, match="does not allow http"):
        run_training(spec, recorder().context())
    with pytest.raises(JobError, match="resolves to a loopback address"):  # http allowed, but not internal hosts
        run_training(spec, recorder().context(allow_http=True))
    allowed = recorder().context(allow_http=True, dataset_allow_nets=("127.0.0.2/32",))
    assert run_training(spec, allowed).status == "completed"


def test_the_node_limits_reach_the_download(recorder: Callable[..., Recorder], spec_for: SpecFor,
                                            http_dataset: str, data_root: Path) -> None:
    spec = spec_for(MLP, {"url": http_dataset})
    with pytest.raises(JobError, match="larger than 0 MiB"):  # the context's cap is the download's cap
        run_training(spec, recorder().context(allow_http=True, dataset_allow_nets=("127.0.0.2/32",),
                                              max_dataset_mb=0))
    (data_root / "table.csv").write_bytes(b"1,0\n" * 300_000)  # 1.2 MiB: read up to the cap, not past it
    with pytest.raises(JobError, match="larger than 1 MiB"):
        run_training(spec_for(MLP, {"url": "table.csv"}), recorder().context(data_root=data_root, max_dataset_mb=1))


@pytest.mark.parametrize(("make", "url", "message"), [
    (None, "../outside.npz", "outside the node's data directory"),
    (None, "/etc/hostname.npz", "outside the node's data directory"),
    ("symlink", "escape.npz", "outside the node's data directory"),
    (None, "missing.npz", "cannot read dataset file"),
    (npz_bytes(x=np.zeros((4, 2))), "no_y.npz", "lacks y"),
    (npz_bytes(x=np.zeros((4, 2)), y=np.array([{}, {}, {}, {}], dtype=object)), "pickled.npz", "npz"),
    (b"not a zip file", "junk.npz", "cannot read the dataset as npz"),
    (npz_bytes(x=np.zeros((4, 2)), y=np.zeros(3, dtype=np.int64)), "lengths.npz", "x has 4 samples but y has 3"),
    (npz_bytes(x=np.full((4, 2), np.nan), y=np.zeros(4, dtype=np.int64)), "nan.npz", "NaN"),
    (npz_bytes(x=np.zeros((4, 2)), y=np.array([0, 1, -1, 0])), "negative.npz", "non-negative integer class"),
    (b"a,b\n1,x\n2,y\n", "words.csv", "csv data row 1, column 2 is not a number"),
    (b"a,b,c\n1,2,3\n4,5\n", "ragged.csv", "row 2 has 2 columns"),
    # the data loads, but the model cannot fit it: the spec's field is named
    (npz_bytes(x=np.zeros((8, 3)), y=np.arange(8) % 2), "flat.npz", "model.type: a cnn needs image-shaped data"),
])
def test_unusable_data_is_a_job_error(recorder: Callable[..., Recorder], spec_for: SpecFor, data_root: Path,
                                      make: bytes | str | None, url: str, message: str) -> None:
    if isinstance(make, bytes):
        (data_root / url).write_bytes(make)
    elif make == "symlink":
        outside = data_root.parent / "secret.npz"
        x, y = separable()
        outside.write_bytes(npz_bytes(x=x, y=y))
        (data_root / url).symlink_to(outside)
    model = {"type": "cnn"} if url == "flat.npz" else MLP
    with pytest.raises(JobError, match=message):
        run_training(spec_for(model, {"url": url}), recorder().context(data_root=data_root))


def test_local_files_refused_without_a_data_root(recorder: Callable[..., Recorder], spec_for: SpecFor) -> None:
    with pytest.raises(JobError, match="no data directory"):
        run_training(spec_for(MLP, {"url": "data.npz"}), recorder().context())


def test_a_loss_that_overflows_is_a_job_error(recorder: Callable[..., Recorder], spec_for: SpecFor,
                                              data_root: Path) -> None:
    x = np.ones((32, 2), dtype=np.float32)
    (data_root / "huge.npz").write_bytes(npz_bytes(x=x, y=np.full(32, 1e30, dtype=np.float32)))  # MSE: 1e60
    with pytest.raises(JobError, match="loss became inf"):
        run_training(spec_for(MLP, {"url": "huge.npz"}), recorder().context(data_root=data_root))


@pytest.mark.parametrize(("model", "dataset"), [
    (MLP, "digits"),
    ({"type": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 1, "context": 64}, "tiny-text"),
])
def test_no_validation_split(recorder: Callable[..., Recorder], spec_for: SpecFor, model: dict[str, Any],
                             dataset: str) -> None:
    result = run_training(spec_for(model, {"name": dataset, "val_fraction": 0.0}), recorder().context())
    assert result.status == "completed" and "loss" in result.metrics
    assert "val_loss" not in result.metrics and "val_accuracy" not in result.metrics
