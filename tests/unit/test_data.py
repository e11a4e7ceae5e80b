"""Training data: the built-in corpus, the sources, and deterministic, rank-disjoint batches."""
from __future__ import annotations

import numpy as np
import pytest

from dist_spectral.training.config import DataConfig
from dist_spectral.training.data import TokenData, builtin_corpus, load_tokens, stdlib_files


def make(n_tokens=10_000, seq_len=16, batch_size=4, world_size=3, seed=0, val=None):
    tokens = np.arange(n_tokens, dtype=np.uint32)  # token id = position: windows are recognisable
    val = val if val is not None else np.arange(n_tokens, n_tokens + 2_000, dtype=np.uint32)
    return TokenData(tokens, val, seq_len, batch_size, world_size, seed)


def test_builtin_corpus_is_deterministic_bytes_without_site_packages():
    a, b = builtin_corpus(200_000), builtin_corpus(200_000)
    assert len(a) == 200_000 and np.array_equal(a, b)
    assert a.dtype == np.uint8
    assert not any("site-packages" in str(p) for p in stdlib_files())
    assert b"def " in a.tobytes() and b"import " in a.tobytes()  # Python source


def test_builtin_split_holds_out_the_tail():
    cfg = DataConfig(max_bytes=100_000, val_fraction=0.1)
    train, val, vocab = load_tokens(cfg)
    full = builtin_corpus(100_000)
    assert vocab == 256 and len(val) == 10_000 and len(train) == 90_000
    assert np.array_equal(np.concatenate([train, val]), full)


def test_batches_depend_only_on_seed_step_rank():
    a, b = make(), make()
    for step in (0, 1, 57, 1000):
        for rank in range(3):
            assert np.array_equal(a.train_windows(step, rank), b.train_windows(step, rank))
    # Asking in another order (as after a resume) gives the same batch.
    c = make()
    c.train_windows(500, 1)
    assert np.array_equal(c.train_windows(3, 2), a.train_windows(3, 2))
    assert not np.array_equal(make(seed=1).train_windows(0, 0), a.train_windows(0, 0))


def test_batch_contents_are_the_windows():
    data = make()
    x = data.train_batch(4, 1)
    windows = data.train_windows(4, 1)
    assert x.shape == (4, 16) and x.dtype.is_floating_point is False
    assert np.array_equal(x[:, 0].numpy(), windows * 16)
    assert np.array_equal(x.numpy() - x[:, :1].numpy(), np.broadcast_to(np.arange(16), (4, 16)))


def test_ranks_are_disjoint_and_an_epoch_covers_every_window_once():
    data = make(world_size=3)
    steps_per_epoch = data.n_train // (data.batch_size * 3)
    seen = []
    for step in range(steps_per_epoch):
        per_rank = [set(data.train_windows(step, r)) for r in range(3)]
        assert not (per_rank[0] & per_rank[1] or per_rank[0] & per_rank[2] or per_rank[1] & per_rank[2])
        seen += [w for s in per_rank for w in s]
    assert len(seen) == len(set(seen)) == steps_per_epoch * data.batch_size * 3
    assert set(seen) <= set(range(data.n_train))


def test_validation_is_disjoint_from_training_and_split_over_ranks(tmp_path):
    tokens = np.arange(20_000, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    train, val, _ = load_tokens(DataConfig(source="memmap", path=str(path), val_fraction=0.1))
    assert isinstance(train, np.memmap)
    data = TokenData(train, val, seq_len=16, batch_size=4, world_size=2)
    train_ids = {int(t) for step in range(50) for r in range(2) for t in data.train_batch(step, r).flatten()}
    val_batches = [data.val_batches(r, batches=3) for r in range(2)]
    val_ids = [{int(t) for x in vb for t in x.flatten()} for vb in val_batches]
    assert not (train_ids & (val_ids[0] | val_ids[1]))
    assert not (val_ids[0] & val_ids[1])
    assert min(val_ids[0] | val_ids[1]) >= 18_000
    assert len(val_batches[0]) == len(val_batches[1]) == 3  # every rank runs the same number of forwards


def test_memmap_directory_uses_val_bin(tmp_path):
    np.arange(5_000, dtype=np.uint32).tofile(tmp_path / "train.bin")
    np.arange(7, 1_007, dtype=np.uint32).tofile(tmp_path / "val.bin")
    train, val, _ = load_tokens(DataConfig(source="memmap", path=str(tmp_path), dtype="uint32"))
    assert len(train) == 5_000 and int(val[0]) == 7 and len(val) == 1_000


def test_text_files_with_the_byte_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "skip.bin").write_bytes(b"\xff" * 100)
    train, val, vocab = load_tokens(DataConfig(source="text", path=str(tmp_path), val_fraction=0.25))
    assert vocab == 256 and len(train) + len(val) == 12 * 200
    assert bytes(train[:11].astype(np.uint8)) == b"hello world"


def test_out_of_vocabulary_tokens_are_an_error():
    data = TokenData(np.full(1_000, 300, dtype=np.uint16), np.full(100, 5, dtype=np.uint16), 8, 2, 1, vocab_size=256)
    with pytest.raises(ValueError, match="token id 300 but the model's vocabulary has 256"):
        data.train_batch(0, 0)


def test_too_little_data_is_an_error():
    with pytest.raises(ValueError, match="fewer than one step needs"):
        TokenData(np.zeros(100, dtype=np.uint16), np.zeros(100, dtype=np.uint16), 16, 4, 2)
    data = TokenData(np.zeros(1_000, dtype=np.uint16), np.zeros(20, dtype=np.uint16), 16, 4, 2)
    with pytest.raises(ValueError, match="validation split"):
        data.val_batches(0, 2)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data.path"):
        load_tokens(DataConfig(source="memmap"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokens(DataConfig(source="memmap", path=str(tmp_path / "nope.bin")))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_tokens(DataConfig(source="text", path=str(tmp_path), tokenizer=str(tmp_path / "no-tokenizer")))


def test_validation_windows_cover_the_whole_split():
    """Validation reads windows from the start to the end of the split, not just its first documents."""
    data = make(val=np.arange(10_000, 10_000 + 16 * 100, dtype=np.uint32))  # 100 windows of 16
    firsts = sorted(int(b[j, 0]) for r in range(3) for b in data.val_batches(r, batches=2) for j in range(len(b)))
    windows = [(t - 10_000) // 16 for t in firsts]
    assert len(set(windows)) == 24 and windows[0] == 0 and windows[-1] >= 90
