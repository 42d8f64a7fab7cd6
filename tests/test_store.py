import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meshfl.core.params import Layout, Params
from meshfl.core.store import DirectoryStore, MemoryStore, Store, StoreError

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = Layout(("conv.weight", "fc.bias"), ((2, 3, 4), (5,)))


@pytest.fixture(params=["memory", "directory"])
def store(request, tmp_path):
    return MemoryStore() if request.param == "memory" else DirectoryStore(tmp_path / "peer-0")


def make_params(seed: int = 0, layout: Layout = LAYOUT) -> Params:
    g = torch.Generator().manual_seed(seed)
    return Params(torch.randn(layout.numel, generator=g), layout)


def test_both_stores_satisfy_the_protocol(tmp_path):
    assert isinstance(MemoryStore(), Store) and isinstance(DirectoryStore(tmp_path), Store)


def test_bytes_round_trip_with_meta(store):
    meta = {"round": 3, "loss": 0.25, "tag": "x", "ok": True, "none": None, "ids": [1, 2], "nested": {"a": [{"b": 1.5}]}}
    store.put_bytes("blob", b"\x00\x01hello\xff", meta)
    assert store.get_bytes("blob") == (b"\x00\x01hello\xff", meta)
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == (b"", {})


def test_params_round_trip_is_bit_equal(store):
    params = make_params()
    store.put_params("model", params, {"round": 7})
    got, meta = store.get_params("model", LAYOUT)
    assert meta == {"round": 7}
    assert got.layout == LAYOUT and got.layout.fingerprint == LAYOUT.fingerprint
    assert torch.equal(got.flat.view(torch.int32), params.flat.view(torch.int32))
    assert torch.equal(got.tensor("conv.weight"), params.tensor("conv.weight"))


def test_missing_entry_is_none(store):
    assert store.get_bytes("nothing") is None and store.get_params("nothing", LAYOUT) is None
    assert "nothing" not in store
    store.delete("nothing")  # deleting what is not there is not an error


def test_overwrite_replaces_value_and_kind(store):
    store.put_bytes("x", b"old", {"v": 1})
    store.put_bytes("x", b"new", {"v": 2})
    assert store.get_bytes("x") == (b"new", {"v": 2})
    store.put_params("x", make_params(1), {"v": 3})
    got, meta = store.get_params("x", LAYOUT)
    assert meta == {"v": 3} and got.equal(make_params(1))
    with pytest.raises(StoreError, match="'x'.*params, not bytes"):
        store.get_bytes("x")
    store.put_bytes("y", b"1")
    with pytest.raises(StoreError, match="'y'.*bytes, not params"):
        store.get_params("y", LAYOUT)


def test_names_sorted_delete_and_wipe(store):
    for name in ["b", "a.1", "C", "_z", "a-2"]:
        store.put_bytes(name, name.encode())
    store.put_params("model", make_params())
    assert store.names() == sorted(["b", "a.1", "C", "_z", "a-2", "model"])
    assert "b" in store and "model" in store and "nope" not in store and ".bad" not in store and 3 not in store
    store.delete("b")
    assert "b" not in store and store.get_bytes("b") is None and "b" not in store.names()
    store.wipe()
    assert store.names() == [] and store.get_params("model", LAYOUT) is None


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../up", "a b", "x" * 129, "é", None, 5])
def test_bad_names_are_refused_naming_them(store, name):
    for call in (lambda: store.put_bytes(name, b"x"), lambda: store.get_bytes(name),
                 lambda: store.put_params(name, make_params()), lambda: store.delete(name)):
        with pytest.raises(StoreError, match="bad name") as err:
            call()
        assert repr(name) in str(err.value) and "\n" not in str(err.value)
    assert store.names() == []


def test_longest_name_is_fine(store):
    store.put_bytes("x" * 128, b"ok")
    assert store.names() == ["x" * 128]


@pytest.mark.parametrize("meta, field", [
    ({"loss": float("nan")}, "meta.loss"),
    ({"a": {"b": [1, float("inf")]}}, r"meta.a.b\[1\]"),
    ({"a": [1, object()]}, r"meta.a\[1\]"),
    ({"t": (1, 2)}, "meta.t"),
    ({"x": b"raw"}, "meta.x"),
    ({"n": np.float32(1.0)}, "meta.n"),
    ({"d": {3: "x"}}, "meta.d has non-str key 3"),
    ([1, 2], "meta must be a dict"),
])
def test_bad_meta_is_refused_naming_the_field(store, meta, field):
    with pytest.raises(StoreError, match=field) as err:
        store.put_bytes("entry", b"x", meta)
    assert "'entry'" in str(err.value)
    with pytest.raises(StoreError, match=field):
        store.put_params("entry", make_params(), meta)
    assert "entry" not in store


def test_layout_mismatch_is_refused(store):
    store.put_params("model", make_params())
    other = Layout(("conv.weight", "fc.bias"), ((2, 3, 4), (6,)))
    with pytest.raises(StoreError, match=f"'model'.*{LAYOUT.fingerprint}.*{other.fingerprint}"):
        store.get_params("model", other)


def test_returned_values_are_independent_of_stored_ones(store):
    params = make_params(2)
    original = params.flat.clone()
    meta = {"list": [1, 2], "d": {"k": 1}}
    store.put_params("model", params, meta)
    meta["list"].append(3)  # mutating the caller's meta after put changes nothing
    got, got_meta = store.get_params("model", LAYOUT)
    got.flat.add_(1.0)
    got_meta["list"].append(4)
    again, again_meta = store.get_params("model", LAYOUT)
    assert torch.equal(again.flat, original) and torch.equal(params.flat, original)
    assert again_meta == {"list": [1, 2], "d": {"k": 1}}

    data = bytearray(b"abc")
    store.put_bytes("blob", data)
    data[0] = ord("z")
    assert store.get_bytes("blob")[0] == b"abc"


def test_size_bound_refuses_large_puts(tmp_path):
    for store in (MemoryStore(max_entry_bytes=1000), DirectoryStore(tmp_path, max_entry_bytes=1000)):
        store.put_bytes("ok", b"x" * 900)
        with pytest.raises(StoreError, match="'big'.*exceeds max_entry_bytes=1000"):
            store.put_bytes("big", b"x" * 1001)
        big = Layout(("w",), ((300,),))  # 1200 bytes
        with pytest.raises(StoreError, match="'bigp'.*exceeds"):
            store.put_params("bigp", Params(torch.zeros(300), big))
        assert store.names() == ["ok"]


def test_directory_store_survives_reopening(tmp_path):
    first = DirectoryStore(tmp_path / "peer")
    first.put_params("model", make_params(3), {"round": 4})
    first.put_bytes("state", b"s", {"k": "v"})
    del first
    second = DirectoryStore(tmp_path / "peer")
    assert second.names() == ["model", "state"]
    got, meta = second.get_params("model", LAYOUT)
    assert got.equal(make_params(3)) and meta == {"round": 4}
    assert second.get_bytes("state") == (b"s", {"k": "v"})
    assert sorted(p.name for p in (tmp_path / "peer").iterdir()) == ["model.safetensors", "state.safetensors"]


def test_directory_store_ignores_and_cleans_leftovers(tmp_path):
    store = DirectoryStore(tmp_path)
    store.put_bytes("kept", b"1")
    (tmp_path / ".kept.abc123.tmp").write_bytes(b"half a write")
    (tmp_path / "notes.txt").write_text("not an entry")
    assert store.names() == ["kept"]
    DirectoryStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors", "notes.txt"]
    store.wipe()
    assert store.names() == [] and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_header", "empty", "flip_data_byte", "garbage"])
def test_damaged_entry_raises_naming_it(tmp_path, damage):
    store = DirectoryStore(tmp_path)
    store.put_params("model-7", make_params(), {"round": 1})
    store.put_bytes("blob", b"x" * 64)
    for name in ("model-7", "blob"):
        path = tmp_path / f"{name}.safetensors"
        data = path.read_bytes()
        if damage == "truncate_half":
            data = data[:len(data) // 2]
        elif damage == "truncate_header":
            data = data[:20]
        elif damage == "empty":
            data = b""
        elif damage == "flip_data_byte":
            data = data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:]
        else:
            data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"
        path.write_bytes(data)
    reopened = DirectoryStore(tmp_path)
    with pytest.raises(StoreError, match="'model-7'.*corrupt") as err:
        reopened.get_params("model-7", LAYOUT)
    assert "\n" not in str(err.value)
    with pytest.raises(StoreError, match="'blob'.*corrupt"):
        reopened.get_bytes("blob")


WRITER = """
import sys, torch
from meshfl.core.params import Layout, Params
from meshfl.core.store import DirectoryStore
path, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
layout = Layout(("w",), ((n,),))
store = DirectoryStore(path)
print("ready", flush=True)
i = start
while True:
    store.put_params("model", Params(torch.full((n,), float(i)), layout), {"i": i})
    print(i, flush=True)  # acknowledged: from here on a reader must see i or later
    i += 1
"""


@pytest.mark.timeout(120)
def test_writer_killed_mid_write_leaves_old_or_new_entry(tmp_path):
    """SIGKILL a real writer of 80 MB entries at random moments: a reader sees a whole version or none."""
    n = 20_000_000
    layout = Layout(("w",), ((n,),))
    rng = np.random.default_rng(1234)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    seen, leftovers = None, 0
    kills = 5
    for k in range(kills):
        start = 1000 * (k + 1)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start), str(n)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        acked = []
        try:
            assert proc.stdout.readline().strip() == "ready"
            if k == kills - 1:  # the last kill always comes after a completed write, so that case is covered
                acked.append(int(proc.stdout.readline()))
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        acked += [int(line) for line in proc.stdout.read().split()]
        proc.stdout.close()
        leftovers += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

        store = DirectoryStore(tmp_path)  # opening cleans the killed writer's temporary file
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
        got = store.get_params("model", layout)
        if got is None:
            assert seen is None and not acked
            continue
        params, meta = got
        i = meta["i"]
        assert params.layout == layout and bool(torch.all(params.flat == float(i))), f"entry {i} holds mixed data"
        # the last acknowledged write, or the one in flight when killed if its rename landed
        allowed = {acked[-1], acked[-1] + 1} if acked else {start} | ({seen} if seen is not None else set())
        assert i in allowed, (i, acked[-3:], seen)
        seen = i
    assert seen is not None
    print(f"kills={kills} with temp leftovers={leftovers}")


def test_a_directory_store_whose_folder_was_deleted_under_it_reads_empty_and_writes_again(tmp_path):
    """`meshfl launch` wipes a running peer's store by deleting its folder: the peer must go on, not crash."""
    import shutil

    store = DirectoryStore(tmp_path / "store")
    params = Params(torch.arange(6, dtype=torch.float32), Layout(("w",), ((6,),)))
    store.put_params("model", params, {"round": 1})
    shutil.rmtree(tmp_path / "store")
    assert store.names() == [] and "model" not in store and store.get_params("model", params.layout) is None
    store.delete("model")
    store.wipe()
    store.put_params("model", params, {"round": 2})
    got, meta = store.get_params("model", params.layout)
    assert torch.equal(got.flat, params.flat) and meta == {"round": 2} and store.names() == ["model"]
