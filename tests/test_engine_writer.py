"""The shard writer: page-aligned data, direct writes where the file system takes them, and the
same bytes whichever path each write took."""

import os

import pytest
import torch
from safetensors.torch import load_file

import dare_lab.engine.writer as W


def entries():
    # odd sizes: tensor starts fall anywhere inside a page, so heads and tails are unaligned
    return [("a", (3, 50_001), torch.bfloat16), ("b", (7,), torch.float32), ("c", (40_000, 5), torch.float16)]


def tensors():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape, dtype in entries()}


def write_all(tmp_path, direct, chunked):
    w = W.ShardedSafetensorsWriter(tmp_path, entries(), direct=direct)
    data = tensors()
    for name, t in data.items():
        if chunked:
            flat = t.reshape(-1)
            for s in range(0, flat.numel(), 70_001):
                w.write_range(name, s, flat[s: s + 70_001])
            w.done(name)
        else:
            w.write(name, t)
    w.patch("a", torch.tensor([0, 5, 149_999]), torch.tensor([1.0, -2.0, 3.0]))
    data["a"].view(-1)[torch.tensor([0, 5, 149_999])] = torch.tensor([1.0, -2.0, 3.0]).to(torch.bfloat16)
    w.finish()
    return data, w


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_written_tensors_load_back_exactly(tmp_path, direct, chunked):
    data, _ = write_all(tmp_path, direct, chunked)
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == data.keys()
    for k in data:
        assert torch.equal(got[k].view(torch.uint8), data[k].contiguous().view(torch.uint8)), k
    header = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    assert (8 + header) % W.ALIGN == 0   # tensor data starts on a page boundary


def track_direct_fds(monkeypatch):
    """The set of file descriptors the writer opens with O_DIRECT (filled as it opens them)."""
    fds = set()
    real_open = os.open

    def tracking_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & getattr(os, "O_DIRECT", 0):
            fds.add(fd)
        return fd
    monkeypatch.setattr(W.os, "open", tracking_open)
    return fds


def supports_direct(path):
    try:
        fd = os.open(path / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


def test_direct_and_buffered_files_are_identical(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "b").mkdir()
    direct_writes = []
    real_write = W._pwrite_all
    direct_fds = track_direct_fds(monkeypatch)

    def tracking_write(fd, buf, offset):
        if fd in direct_fds:
            direct_writes.append(len(buf))
        real_write(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", tracking_write)
    write_all(tmp_path / "d", True, True)
    if supports_direct(tmp_path):
        assert direct_writes and all(n % W.ALIGN == 0 for n in direct_writes)
    write_all(tmp_path / "b", False, False)
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_refused_direct_write_falls_back_to_buffered(tmp_path, monkeypatch):
    """A file system that opens O_DIRECT but refuses the write (EINVAL): same bytes, direct off."""
    real = W._pwrite_all
    direct_fds = track_direct_fds(monkeypatch)

    def refusing(fd, buf, offset):
        if fd in direct_fds:
            raise OSError(22, "Invalid argument")
        real(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", refusing)
    data, w = write_all(tmp_path, True, True)
    assert w.direct is False
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(got[k].view(torch.uint8), data[k].contiguous().view(torch.uint8)) for k in data)


def test_a_failed_background_write_fails_the_output(tmp_path, monkeypatch):
    """A write-behind that fails (disk full) raises at finish: no output looks complete."""
    real = W._pwrite_all
    direct_fds = track_direct_fds(monkeypatch)
    if not supports_direct(tmp_path):
        pytest.skip("this file system takes no O_DIRECT writes")

    def disk_full(fd, buf, offset):
        if fd in direct_fds or len(buf) >= W.DIRECT_MIN:
            raise OSError(28, "No space left on device")
        real(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_all(tmp_path, True, True)


def test_write_behind_holds_at_most_its_buffers_in_flight(tmp_path, monkeypatch):
    import threading

    if not supports_direct(tmp_path):
        pytest.skip("this file system takes no O_DIRECT writes")
    monkeypatch.setattr(W.ShardedSafetensorsWriter, "WRITE_BEHIND", 2)
    real, gate, started = W._pwrite_all, threading.Event(), []
    direct_fds = track_direct_fds(monkeypatch)

    def slow_disk(fd, buf, offset):
        if fd in direct_fds:
            started.append(offset)
            gate.wait(30)
        real(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", slow_disk)
    w = W.ShardedSafetensorsWriter(tmp_path, [("x", (5, 100_000), torch.float32)])
    x = torch.randn(5, 100_000)
    sent = []

    def produce():
        for i in range(5):   # rows start off a page: each goes through the write-behind copy
            w.write_range("x", i * 100_000, x[i])
            sent.append(i)
    t = threading.Thread(target=produce)
    t.start()
    t.join(1.0)
    assert t.is_alive() and len(sent) == 2   # two buffers in flight, the third write waits for one
    gate.set()
    t.join(30)
    w.done("x")
    w.finish()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["x"], x)


def test_shard_plan_is_huggingface_hubs(tmp_path):
    """The shard layout is the one save_pretrained writes (huggingface_hub's split), including a
    tensor larger than the limit alone in its own shard, and bad sizes fail in one line."""
    import pytest
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    from dare_lab.engine.writer import ShardedSafetensorsWriter

    sd = {"a": torch.zeros(1000), "b": torch.zeros(3000), "c": torch.zeros(10), "d": torch.zeros(900, dtype=torch.bfloat16)}
    want = split_torch_state_dict_into_shards(sd, max_shard_size="6KB")
    w = ShardedSafetensorsWriter(tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in sd.items()], "6KB")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(want.filename_to_tensors)
    from safetensors import safe_open

    for fname, keys in want.filename_to_tensors.items():
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert sorted(f.keys()) == sorted(keys)
    w.close()
    with pytest.raises(ValueError, match="Unit 'XB' not supported"):
        ShardedSafetensorsWriter(tmp_path / "x", [("a", (4,), torch.float32)], "6XB")


def test_existing_output_message_names_the_cli_key(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match=r"output\.overwrite=true"):
        W.AtomicDir(tmp_path / "out")
