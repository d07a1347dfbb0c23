"""scripts/prepare_data.py: `status` on a data root holding verified, missing, corrupt, checksum-less and
generated datasets; the AV-MNIST builder refusing an incomplete FSDD copy and never leaving its hidden
staging folder behind (cleaned on failure, stale ones removed by the next build)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_avmnist import make_sources

from fusionbench import ROOT
from fusionbench.data import avmnist_build as build
from fusionbench.errors import DatasetError

sys.path.insert(0, str(ROOT / "scripts"))
try:
    import prepare_data
finally:
    sys.path.pop(0)


def rows_of(text: str) -> dict[str, str]:
    """``{dataset: its table line}`` of a `status` report."""
    names = prepare_data.dataset_names()
    return {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in names}


@pytest.fixture
def data_root(tmp_path) -> Path:
    """rosmap intact, stocks with MCD.csv altered, mmimdb unreadable, mosei present (no checksum to
    compare), brca and avmnist absent, and a staging folder a killed build left."""
    root = tmp_path / "data"
    shutil.copytree(ROOT / "data" / "rosmap", root / "rosmap")
    shutil.copytree(ROOT / "data" / "stocks", root / "stocks")
    with open(root / "stocks" / "MCD.csv", "a") as f:
        f.write("\n2021-03-01,1,1,1,1,1,1")
    (root / "mmimdb").mkdir()
    (root / "mmimdb" / "multimodal_imdb.hdf5").write_bytes(b"not an HDF5 file")
    (root / "mosei").mkdir()
    (root / "mosei" / "mosei_senti_data.pkl").write_bytes(b"\x80\x04N.")
    (root / ".avmnist-k1lled00" / "avmnist").mkdir(parents=True)
    return root


def test_status_names_each_state_folder_and_source(data_root, monkeypatch, capsys):
    monkeypatch.setenv("FUSIONBENCH_DATA_DIR", str(data_root))
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "status"])
    with pytest.raises(SystemExit) as e:
        prepare_data.main()
    assert e.value.code == 0  # what it finds never fails the command
    out = capsys.readouterr().out
    assert f"data root: {data_root}" in out and "FUSIONBENCH_DATA_DIR" in out
    rows = rows_of(out)
    assert sorted(rows) == prepare_data.dataset_names()  # one row per configs/dataset/*.yaml
    assert rows["rosmap"].split()[1] == "verified" and str(data_root / "rosmap") in rows["rosmap"]
    assert "8 files match their published checksums" in rows["rosmap"]
    assert rows["stocks"].split()[1] == "corrupt" and "bad file: MCD.csv" in rows["stocks"]
    assert rows["stocks_health"].split()[1] == "verified" and rows["stocks_tech"].split()[1] == "verified"
    assert rows["mmimdb"].split()[1] == "corrupt" and "multimodal_imdb.hdf5" in rows["mmimdb"]
    assert rows["mosei"].split()[1] == "present" and "no published checksum: presence only" in rows["mosei"]
    assert rows["brca"].split()[1] == "missing" and str(data_root / "brca") in rows["brca"]
    assert "folder does not exist" in rows["brca"] and "prepare_data.py brca --from" in rows["brca"]
    assert rows["avmnist"].split()[1] == "missing" and "prepare_data.py avmnist" in rows["avmnist"]
    for name in ("lattice", "generative", "synthetic", "rgbd_synthetic"):
        assert rows[name].split()[1:4] == ["generated", "-", "no"] and "no files" in rows[name]
    # the loaders' own messages say what exactly is wrong
    assert "MCD.csv: sha256 is" in out and "not a readable HDF5 file" in out
    assert ".avmnist-k1lled00" in out  # the leftover staging folder is pointed out, not removed
    assert (data_root / ".avmnist-k1lled00").is_dir()
    assert "2 corrupt" in out and "4 generated" in out


def test_status_quick_checks_presence_only(data_root):
    text, rows = prepare_data.status(data_root, quick=True)
    state = {r.name: r.state for r in rows}
    assert state["stocks"] == "present" and state["rosmap"] == "present" and state["brca"] == "missing"
    assert "presence only (--quick)" in text and "--data-dir" in text
    assert "checksums not checked" in rows_of(text)["stocks"]


def test_status_on_an_incomplete_folder_names_the_missing_files(tmp_path):
    shutil.copytree(ROOT / "data" / "rosmap", tmp_path / "rosmap")
    (tmp_path / "rosmap" / "2_te.csv").unlink()
    (tmp_path / "mosei").mkdir()
    _, rows = prepare_data.status(tmp_path, quick=True)
    by_name = {r.name: r for r in rows}
    assert (
        by_name["rosmap"].state == "missing" and by_name["rosmap"].detail == "1 of 8 files missing: 2_te.csv"
    )
    assert "no published checksum" in by_name["mosei"].detail  # said before anyone fetches the file


# -- the AV-MNIST builder ----------------------------------------------------------------------


def write_sums(fsdd: Path) -> None:
    """FSDD's SHA256SUMS as `sha256sum recordings/*.wav` writes it."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  recordings/{p.name}\n"
        for p in sorted((fsdd / "recordings").iterdir())
    ]
    (fsdd / "SHA256SUMS").write_text("".join(lines))


def test_build_refuses_an_fsdd_copy_missing_a_listed_file(tmp_path):
    mnist, fsdd = make_sources(tmp_path / "src")
    write_sums(fsdd)
    (fsdd / "recordings" / "4_george_0.wav").unlink()  # a speaker the build does not even use
    data = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        build.build_avmnist(mnist, fsdd, data)
    msg = str(e.value)
    assert "recordings/4_george_0.wav" in msg and "SHA256SUMS" in msg and "incomplete" in msg
    assert "free-spoken-digit-dataset" in msg and "\n" not in msg
    assert not data.exists() or list(data.iterdir()) == []


def test_build_without_sha256sums_refuses_a_gap_in_the_takes(tmp_path):
    mnist, fsdd = make_sources(tmp_path / "src")
    (fsdd / "recordings" / "3_jackson_1.wav").unlink()  # jackson has takes 0 and 1 of every other digit
    with pytest.raises(DatasetError, match=r"1 recording\(s\) .* missing: recordings/3_jackson_1.wav"):
        build.build_avmnist(mnist, fsdd, tmp_path / "data")


@pytest.mark.parametrize("failure", [DatasetError("disk full"), KeyboardInterrupt()])
def test_a_failed_build_leaves_no_staging_folder(tmp_path, monkeypatch, failure):
    mnist, fsdd = make_sources(tmp_path / "src")
    data = tmp_path / "data"

    def fail(*a, **k):
        assert [p.name[:9] for p in data.iterdir()] == [".avmnist-"]  # staging had begun
        raise failure

    monkeypatch.setattr(build, "make_audio", fail)
    with pytest.raises(type(failure)):
        build.build_avmnist(mnist, fsdd, data)
    assert list(data.iterdir()) == []


def test_sigterm_unwinds_so_staging_is_removed(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e, prepare_data.sigterm_unwinds():
        with build.tempfile.TemporaryDirectory(dir=tmp_path, prefix=".avmnist-"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


def test_the_next_build_removes_stale_staging_folders(tmp_path):
    mnist, fsdd = make_sources(tmp_path / "src")
    data = tmp_path / "data"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now belongs to no process

    def staging(name: str, pid: int | None) -> Path:
        folder = data / name
        (folder / "avmnist" / "audio").mkdir(parents=True)
        (folder / "avmnist" / "audio" / "train_data.npy").write_bytes(b"half-written")
        if pid is not None:
            (folder / build.STAGING_OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        return folder

    killed = staging(".avmnist-dead0pid", gone.pid)
    old = staging(".avmnist-noowner0", None)  # a build from before owners were recorded
    running = staging(".avmnist-running0", os.getpid())
    (data / ".avmnist-backup").mkdir()  # not a staging name: never touched
    logs: list[str] = []
    out = build.build_avmnist(mnist, fsdd, data, log=logs.append)
    assert (
        not killed.exists() and not old.exists() and running.is_dir() and (data / ".avmnist-backup").is_dir()
    )
    removed = [m for m in logs if m.startswith("removed stale staging folder")]
    assert len(removed) == 2 and f"process {gone.pid} is gone" in " ".join(removed)
    assert any("kept staging folder" in m and ".avmnist-running0" in m for m in logs)
    assert (out / "manifest.json").is_file()
    assert sorted(p.name for p in data.iterdir()) == [".avmnist-backup", ".avmnist-running0", "avmnist"]
