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


def _stage_all(w, data, names):
    for name in names:
        st = w.staged(name)
        st.copy_(data[name].reshape(-1))
        w.write_staged(name, st.view(data[name].shape))


def test_staged_tensors_are_written_behind_at_most_two_at_once(tmp_path, monkeypatch):
    """write_staged hands the staged buffer to a background write and returns (the thread's next
    staged buffer is another one); a third waits while two are in flight; the bytes are exact."""
    import threading

    if not supports_direct(tmp_path):
        pytest.skip("this file system takes no O_DIRECT writes")
    real, gate = W._pwrite_all, threading.Event()
    direct_fds = track_direct_fds(monkeypatch)

    def slow_disk(fd, buf, offset):
        if fd in direct_fds:
            gate.wait(30)
        real(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", slow_disk)
    ents = [(f"t{i}", (300, 1000), torch.float32) for i in range(3)]
    w = W.ShardedSafetensorsWriter(tmp_path, ents)
    g = torch.Generator().manual_seed(1)
    data = {n: torch.randn(s, generator=g) for n, s, _ in ents}
    sent = []

    def produce():
        for name in data:
            _stage_all(w, data, [name])
            sent.append(name)
    t = threading.Thread(target=produce)
    t.start()
    t.join(1.0)
    assert t.is_alive() and sent == ["t0", "t1"], sent   # two in flight, the third waits for one
    gate.set()
    t.join(30)
    w.finish()
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(got[n], data[n]) for n in data)


def test_a_failed_staged_write_fails_the_output(tmp_path, monkeypatch):
    if not supports_direct(tmp_path):
        pytest.skip("this file system takes no O_DIRECT writes")
    direct_fds = track_direct_fds(monkeypatch)
    real = W._pwrite_all

    def disk_full(fd, buf, offset):
        if fd in direct_fds or len(buf) >= W.DIRECT_MIN:
            raise OSError(28, "No space left on device")
        real(fd, buf, offset)
    monkeypatch.setattr(W, "_pwrite_all", disk_full)
    data = tensors()
    w = W.ShardedSafetensorsWriter(tmp_path, entries())
    _stage_all(w, data, ["a"])                  # returns: the failure happens behind
    with pytest.raises(OSError, match="No space left on device"):
        w.finish()


def test_a_staged_tensor_over_the_limit_is_written_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(W.ShardedSafetensorsWriter, "STAGED_BEHIND_MAX", 16)
    data = tensors()
    w = W.ShardedSafetensorsWriter(tmp_path, entries())
    _stage_all(w, data, data)
    assert w._staged_exec is None               # nothing went behind: every tensor is over 16 bytes
    w.finish()
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(got[k].view(torch.uint8), data[k].contiguous().view(torch.uint8)) for k in data)


def test_staged_buffers_of_many_sizes_are_reused_and_every_tensor_is_exact(tmp_path):
    """Tensors of mixed sizes staged and written behind from two threads: buffers come back as
    spares of several sizes and are picked by size; every byte lands where it belongs."""
    import threading

    sizes = [700_000, 3_000, 1_200_000, 500, 900_000, 300_000, 1_500_000, 20_000, 400_000, 1_000] * 2   # 1-6 MB buffers
    ents = [(f"t{i}", (n,), torch.float32) for i, n in enumerate(sizes)]
    w = W.ShardedSafetensorsWriter(tmp_path, ents)
    g = torch.Generator().manual_seed(2)
    data = {name: torch.randn(shape, generator=g) for name, shape, _ in ents}
    names = list(data)
    threads = [threading.Thread(target=_stage_all, args=(w, data, names[i::2])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    w.finish()
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(got[n], data[n]) for n in names)
