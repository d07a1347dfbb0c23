"""Build AV-MNIST from the MNIST IDX files and the Free Spoken Digit Dataset (FSDD).

Follows the CentralNet / MFAS ``avmnist_gen.py`` procedure (docs/data-formats.md, section 2) and
writes the MultiBench npy layout, so `AVMNISTDataModule` reads this build and the official files alike:

- *image*: MNIST, PCA fitted separately on train and on test (float64, centred); every image is
  reconstructed (mean added back) from the leading components whose cumulative explained variance
  first exceeds ``energy_kept`` (25%), clipped to [0, 255], float32, flattened to 784.
- *audio*: FSDD clips of jackson, nicolas, theo (train) and yweweler (test). Per digit the clips are
  ordered by (speaker, index) and shuffled with the seed; MNIST row i takes the next clip of its
  label, cycling. Noise is mixed in (see below), then a boxcar-window spectrogram with FFT length
  222 (112 one-sided frequency bins) over 112 frames whose starts are
  ``round(linspace(0, len - 222, 112))``, i.e. the hop adapts to the clip so the frames span it
  (clips shorter than 222 + 111 samples are zero-padded to that length). Stored as ``[freq, time]``
  like scipy's ``Sxx`` in the original, and quantised with one fixed, data-independent scale:
  ``u8 = round(255 * log1p(|X|) / log1p(222 * 32768))`` clipped to 0..255 (|X| of int16-valued
  samples; 222 * 32768 is the largest magnitude a full-scale 222-sample frame can reach), so train
  and test share the scale and a build never depends on which clips it happened to contain.

**Noise substitution.** The original mixes every clip with an ESC-50 background clip (amplitude
factor 0.009). ESC-50 is not available here, so each row gets seeded Gaussian white noise at a fixed
SNR (default 10 dB) relative to the clip's RMS, drawn from ``numpy.random.default_rng([seed, split,
1, row])``. Procedure-faithful, not bit-identical; the manifest and PROVENANCE.md say so too.

**Complete sources only.** Every recording listed in FSDD's ``SHA256SUMS`` must be present (without
that file: every speaker used must have the same takes 0..n-1 of every digit), so a copy that lost a
file stops the build instead of silently yielding a build from fewer clips.

Everything is staged in a hidden folder ``.avmnist-XXXXXXXX`` beside the target (holding an ``OWNER``
file with the builder's host and process id) and renamed into place only after the manifest (written
last) is complete, so a failed build leaves neither ``avmnist/`` nor a staging folder. A build that was
killed outright (SIGKILL, power loss) cannot clean up; the next build removes such stale staging folders.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import wave
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fusionbench import __version__
from fusionbench.data.base import sha256_file
from fusionbench.errors import DatasetError

FORMAT_VERSION = 1
SAMPLE_RATE = 8000
N_FFT = 222  # one-sided rfft -> 222 // 2 + 1 = 112 frequency bins
N_FRAMES = 112
LOG_MAX = float(np.log1p(N_FFT * 32768.0))
PROJECTOR_GRID = 2.0**20  # see pca_degrade
TRAIN_SPEAKERS = ("jackson", "nicolas", "theo")
TEST_SPEAKERS = ("yweweler",)
SPLIT_CODE = {"train": 0, "test": 1}  # part of every seed, so train and test streams never coincide
IDX_MAGIC = {"images": 0x803, "labels": 0x801}
MNIST_STEMS = {"train": "train", "test": "t10k"}
CLIP_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
STAGING_OWNER = "OWNER"  # JSON {"host", "pid"} of the build that owns a staging folder
NOISE_NOTE = (
    "ESC-50 background noise (used by the original CentralNet/MFAS AV-MNIST) is not available; "
    "each row is mixed instead with seeded Gaussian white noise at noise_snr_db relative to the "
    "clip's RMS (numpy default_rng([seed, split(0 train, 1 test), 1, row])). Procedure-faithful, "
    "not bit-identical to the MultiBench files."
)
BUILD_COMMAND = (
    "python scripts/prepare_data.py avmnist --mnist ../shared/data/mnist --fsdd ../shared/data/fsdd"
)


# -- MNIST ------------------------------------------------------------------------------------


def _idx_bytes(path: Path) -> bytes:
    """File content, decompressed if it is gzip (detected by its magic, whatever the name says)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"Cannot read {path}: {e}. Re-obtain the MNIST file.") from None


def parse_idx(data: bytes, magic: int, name: str) -> np.ndarray:
    """Parse IDX (big-endian int32 magic, int32 dims, uint8 body) and check size against the header."""
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">i", data[:4])[0] != magic:
        found = f"0x{struct.unpack('>i', data[:4])[0]:x}" if len(data) >= 4 else f"only {len(data)} bytes"
        raise DatasetError(
            f"{name} is not an IDX file with magic 0x{magic:x} (uint8, {ndim}-d): found {found}. "
            "Check that the images and labels files are not swapped and re-obtain the MNIST file."
        )
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(
            f"{name} header says {dims} ({int(np.prod(dims))} bytes) but holds {len(body)} bytes: "
            "the file is truncated or corrupt. Re-obtain it."
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx(path: Path, magic: int) -> np.ndarray:
    return parse_idx(_idx_bytes(path), magic, str(path))


def find_idx(folder: Path, stem: str) -> Path:
    """``stem.gz`` or ``stem`` in ``folder``."""
    for p in (folder / f"{stem}.gz", folder / stem):
        if p.is_file():
            return p
    raise DatasetError(
        f"MNIST file {stem}.gz (or uncompressed {stem}) is missing in {folder}; "
        "point --mnist at the folder holding the four IDX files."
    )


def read_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, str]]]:
    """Images (N, 28, 28) uint8, labels (N,) int64 and the sha256 of both files (stored and decompressed)."""
    stem = MNIST_STEMS[split]
    arrays, sources = {}, {}
    for kind, suffix in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        path = find_idx(folder, f"{stem}-{kind}-{suffix}")
        data = _idx_bytes(path)
        arrays[kind] = parse_idx(data, IDX_MAGIC[kind], str(path))
        sources[path.name] = {"sha256": sha256_file(path), "content_sha256": hashlib.sha256(data).hexdigest()}
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[1:] != (28, 28):
        raise DatasetError(
            f"MNIST {split} images are {images.shape[1:]}, expected 28 x 28; re-obtain the file."
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"MNIST {split} has {len(images)} images but {len(labels)} labels; re-obtain both files."
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(
            f"MNIST {split} labels contain {int(labels.max())}; digits are 0..9. Re-obtain the file."
        )
    return images, labels.astype(np.int64), sources


def pca_degrade(images: np.ndarray, energy_kept: float = 0.25) -> tuple[np.ndarray, int]:
    """Reconstruct every row from the fewest leading principal components whose cumulative explained
    variance exceeds ``energy_kept``; returns (float32 rows clipped to [0, 255], components kept).

    The 784 x 784 covariance is small, so an eigendecomposition beats an SVD of the N x 784 data.
    LAPACK's eigh is not bit-reproducible (its last bits change with the BLAS thread count), so the
    projector P = V_k V_k^T is rounded to a 2^-20 grid (moves pixels by < 0.01 grey levels). For
    integer pixels every product and partial sum below is then an exact float64, so the result does
    not depend on summation order either: a build gives the same bytes with any OMP_NUM_THREADS.
    """
    if not 0.0 < energy_kept < 1.0:
        raise DatasetError(f"energy_kept must be in (0, 1), got {energy_kept}.")
    x = images.reshape(len(images), -1).astype(np.float64)
    n, s = len(x), x.sum(axis=0)
    evals, evecs = np.linalg.eigh(x.T @ x - np.outer(s, s) / n)  # n * covariance
    evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
    ratio = np.cumsum(evals) / evals.sum()
    k = min(int(np.searchsorted(ratio, energy_kept, side="right")) + 1, len(evals))
    v = evecs[:, :k]
    p = np.round((v @ v.T) * PROJECTOR_GRID) / PROJECTOR_GRID
    rec = x @ p + (s - s @ p) / n  # = mean + (x - mean) P
    return np.clip(rec, 0.0, 255.0).astype(np.float32), k


# -- FSDD -------------------------------------------------------------------------------------


def read_wav(path: Path) -> np.ndarray:
    """int16 samples of an 8 kHz mono 16-bit WAV; anything else is refused (the spectrogram's bins
    assume 8 kHz)."""
    try:
        with wave.open(str(path), "rb") as w:
            fmt = (w.getframerate(), w.getnchannels(), w.getsampwidth())
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise DatasetError(f"{path} is not a readable WAV file ({e}); re-obtain it from FSDD.") from None
    if fmt != (SAMPLE_RATE, 1, 2):
        raise DatasetError(
            f"{path} is {fmt[0]} Hz, {fmt[1]} channel(s), {8 * fmt[2]}-bit; FSDD recordings must be "
            f"{SAMPLE_RATE} Hz mono 16-bit. Re-obtain the file from FSDD (do not resample it)."
        )
    return np.frombuffer(frames, dtype="<i2").astype(np.int16)


def list_clips(recordings: Path, speakers: Sequence[str]) -> dict[int, list[Path]]:
    """``{digit: [paths]}`` of ``{digit}_{speaker}_{index}.wav`` ordered by (speaker, index)."""
    if not recordings.is_dir():
        raise DatasetError(
            f"{recordings} does not exist; point --fsdd at the FSDD folder that holds recordings/."
        )
    found: dict[int, list[tuple[str, int, Path]]] = {d: [] for d in range(10)}
    for p in recordings.iterdir():
        m = CLIP_NAME.match(p.name)
        if m and m.group(2) in speakers:
            found[int(m.group(1))].append((m.group(2), int(m.group(3)), p))
    empty = [d for d, clips in found.items() if not clips]
    if empty:
        raise DatasetError(
            f"{recordings} has no recordings of digit(s) {empty} by speakers {list(speakers)}; "
            "check the FSDD copy."
        )
    return {d: [p for *_, p in sorted(clips)] for d, clips in found.items()}


def pair_clips(labels: np.ndarray, clips: Mapping[int, Sequence[Path]], seed: int, split: str) -> list[Path]:
    """The clip of every row: per digit a seeded shuffle of ``clips[digit]``, taken in turn, cycling."""
    order = {}
    for d, c in clips.items():
        perm = np.random.default_rng([seed, SPLIT_CODE[split], 0, d]).permutation(len(c))
        order[d] = [c[i] for i in perm]
    taken = dict.fromkeys(order, 0)
    out = []
    for y in labels.tolist():
        out.append(order[y][taken[y] % len(order[y])])
        taken[y] += 1
    return out


def frame(x: np.ndarray) -> np.ndarray:
    """(112, 222) frames spanning the whole clip; the hop adapts to its length."""
    x = np.asarray(x, dtype=np.float64)
    min_len = N_FFT + N_FRAMES - 1  # smallest length with 112 distinct frame starts
    if len(x) < min_len:
        x = np.pad(x, (0, min_len - len(x)))
    starts = np.round(np.linspace(0, len(x) - N_FFT, N_FRAMES)).astype(np.int64)
    return x[starts[:, None] + np.arange(N_FFT)]


def quantise(frames: np.ndarray) -> np.ndarray:
    """(..., 112 frames, 222) -> (..., 112 freq, 112 time) uint8 log-magnitude spectrogram."""
    mag = np.abs(np.fft.rfft(frames, axis=-1))
    u8 = np.clip(np.round(255.0 * np.log1p(mag) / LOG_MAX), 0, 255).astype(np.uint8)
    return np.swapaxes(u8, -1, -2)


def spectrogram(x: np.ndarray) -> np.ndarray:
    """(112, 112) uint8 ``[freq, time]`` spectrogram of one clip (no noise added)."""
    return quantise(frame(x))


def add_noise(
    x: np.ndarray, snr_db: float, rng: np.random.Generator, ref: np.ndarray | None = None
) -> np.ndarray:
    """``x`` plus white Gaussian noise ``snr_db`` below the RMS of ``ref`` (default ``x``; the build
    passes the unpadded clip so zero padding does not lower the noise level)."""
    x = np.asarray(x, dtype=np.float64)
    ref = x if ref is None else np.asarray(ref, dtype=np.float64)
    rms = float(np.sqrt(np.mean(ref * ref))) if ref.size else 0.0
    return x + rng.standard_normal(len(x)) * (rms * 10.0 ** (-snr_db / 20.0))


def make_audio(
    sources: Sequence[Path],
    wavs: Mapping[Path, np.ndarray],
    seed: int,
    split: str,
    snr_db: float | None,
    chunk: int = 1024,
) -> np.ndarray:
    """(N, 112, 112) uint8 spectrograms, row i from ``sources[i]`` plus row i's own noise (none if
    ``snr_db`` is None).

    Noise is seeded per row, so the result does not depend on ``chunk`` (which only bounds memory:
    the FFT runs on a whole chunk at once).
    """
    out = np.empty((len(sources), N_FFT // 2 + 1, N_FRAMES), dtype=np.uint8)
    buf = np.empty((chunk, N_FRAMES, N_FFT), dtype=np.float64)
    for lo in range(0, len(sources), chunk):
        hi = min(lo + chunk, len(sources))
        for i in range(lo, hi):
            clip = wavs[sources[i]].astype(np.float64)
            # the noise covers the padding too
            x = np.pad(clip, (0, max(0, N_FFT + N_FRAMES - 1 - len(clip))))
            if snr_db is not None:
                x = add_noise(x, snr_db, np.random.default_rng([seed, SPLIT_CODE[split], 1, i]), ref=clip)
            buf[i - lo] = frame(x)
        out[lo:hi] = quantise(buf[: hi - lo])
    return out


# -- build ------------------------------------------------------------------------------------


def _save(folder: Path, rel: str, array: np.ndarray, files: dict) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array, allow_pickle=False)
    files[rel] = {"sha256": sha256_file(path), "shape": list(array.shape), "dtype": str(array.dtype)}


def _provenance(manifest: dict) -> str:
    p = manifest["params"]
    mnist = "\n".join(
        f"| `{n}` | `{s['sha256']}` | `{s['content_sha256']}` |"
        for n, s in manifest["sources"]["mnist"].items()
    )
    files = "\n".join(
        f"| `{n}` | {tuple(f['shape'])} {f['dtype']} | `{f['sha256']}` |"
        for n, f in manifest["files"].items()
        if "shape" in f
    )
    return f"""# AV-MNIST (built by fusionbench)

Rebuilt from MNIST (LeCun et al. 1998) and FSDD (Jakobovski et al., CC BY-SA 4.0) with
`fusionbench.data.avmnist_build`, following the CentralNet / MFAS `avmnist_gen.py` procedure, in the
MultiBench npy layout. Derived data: the licences of both sources apply (MNIST is commonly
redistributed under CC BY-SA 3.0, FSDD is CC BY-SA 4.0). Local build only; not redistributed.

Rebuild: `{manifest["command"]}`

## Recipe
- image: PCA fitted separately on train and test; each image is reconstructed from the leading
  components whose cumulative explained variance first exceeds {p["energy_kept"]} (kept: train
  {p["pca_components"]["train"]}, test {p["pca_components"]["test"]}); clipped to [0, 255], float32, 784 per row.
- audio: speakers {", ".join(p["train_speakers"])} (train) and {", ".join(p["test_speakers"])} (test); per digit
  ordered by (speaker, index), shuffled with seed {p["seed"]}, MNIST row i takes the next clip of its label.
  Clip used by each row: `audio/train_sources.txt`, `audio/test_sources.txt`.
- spectrogram: {p["spectrogram"]}
- splits (done by the loader, as MultiBench): train = first 55,000 train rows, val = the last 5,000, test = test.
  The validation rows hear the same clips (and speakers) as the training rows, only with other noise,
  so audio validation accuracy is optimistic; test is an unseen speaker.

## Noise substitution
{manifest["noise"]} noise_snr_db = {p["noise_snr_db"]}.

## Sources (sha256 of the file as stored / of the decompressed IDX content)
| MNIST file | sha256 | content sha256 |
| --- | --- | --- |
{mnist}

FSDD: {manifest["sources"]["fsdd"]["wavs_used"]} WAVs used; sha256 over their `sha256sum` lines
`{manifest["sources"]["fsdd"]["wavs_sha256"]}`; SHA256SUMS file `{manifest["sources"]["fsdd"]["SHA256SUMS"]}`.

## Files
| file | shape dtype | sha256 |
| --- | --- | --- |
{files}
"""  # noqa: E501 (a Markdown template: its lines are the file's lines)


def read_sums(fsdd_dir: Path) -> dict[str, str] | None:
    """FSDD's ``SHA256SUMS`` (``sha256sum`` output) as ``{relative path: digest}``; None without it."""
    sums_path = fsdd_dir / "SHA256SUMS"
    if not sums_path.is_file():
        return None
    published = {}
    for line in sums_path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:
            published[name.lstrip("*")] = digest
    return published


def _named(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c and 7 more`` for messages that name missing files."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_fsdd_complete(fsdd_dir: Path, published: Mapping[str, str] | None, speakers: Sequence[str]) -> None:
    """Raise unless the FSDD copy is complete: every file ``SHA256SUMS`` lists is present, or (without
    that list) every speaker in ``speakers`` has the same takes 0..n-1 of every digit."""
    recordings = fsdd_dir / "recordings"
    if published is not None:
        missing = sorted(n for n in published if not (fsdd_dir / n).is_file())
        why = f"listed in {fsdd_dir / 'SHA256SUMS'}"
    else:
        takes: dict[tuple[str, int], set[int]] = {}
        for p in recordings.iterdir() if recordings.is_dir() else ():
            m = CLIP_NAME.match(p.name)
            if m and m.group(2) in speakers:
                takes.setdefault((m.group(2), int(m.group(1))), set()).add(int(m.group(3)))
        missing = []
        for s in speakers:
            n = max((max(takes.get((s, d), {-1})) + 1 for d in range(10)), default=0)
            missing += [
                f"recordings/{d}_{s}_{i}.wav"
                for d in range(10)
                for i in range(n)
                if i not in takes.get((s, d), ())
            ]
        why = "(there is no SHA256SUMS, so each speaker must have the same takes 0..n-1 of every digit)"
    if missing:
        raise DatasetError(
            f"The FSDD copy in {fsdd_dir} is incomplete: {len(missing)} recording(s) {why} are missing: "
            f"{_named(missing)}. AV-MNIST is built only from the complete source, so nothing was built. "
            "Re-obtain the missing files from the free-spoken-digit-dataset repository on GitHub "
            "(Jakobovski/free-spoken-digit-dataset, folder recordings/) or point --fsdd at a complete copy."
        )


def _check_against_sums(
    fsdd_dir: Path, published: Mapping[str, str] | None, used: dict[Path, str]
) -> str | None:
    """Compare the used WAVs with FSDD's SHA256SUMS when present; return the file's own sha256."""
    if published is None:
        return None
    by_name = {Path(n).name: h for n, h in published.items()}
    bad = [p.name for p, h in used.items() if by_name.get(p.name, h) != h]
    if bad:
        raise DatasetError(
            f"{len(bad)} FSDD recording(s) do not match {fsdd_dir / 'SHA256SUMS'} (e.g. {bad[:3]}); "
            "re-obtain them from the free-spoken-digit-dataset repository."
        )
    return sha256_file(fsdd_dir / "SHA256SUMS")


# -- staging ----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_staging(
    data_root: Path, name: str, log: Callable[[str], None] = lambda msg: None
) -> list[Path]:
    """Delete the staging folders ``.{name}-XXXXXXXX`` in ``data_root`` left by builds that were killed
    outright: those without an ``OWNER`` file (older builds, or killed before writing it) and those
    whose owner process on this host no longer exists. A running build's folder is kept."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(name)}-[a-z0-9_]{{8}}$")  # tempfile.mkdtemp's names only
    if not data_root.is_dir():
        return removed
    for folder in sorted(p for p in data_root.iterdir() if pattern.match(p.name) and p.is_dir()):
        try:
            owner = json.loads((folder / STAGING_OWNER).read_text())
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            host, pid = None, None
        if host is not None and (host != socket.gethostname() or _pid_alive(pid)):
            log(f"kept staging folder {folder}: process {pid} on {host} may still be building into it")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        who = "no owner recorded" if pid is None else f"process {pid} is gone"
        log(f"removed stale staging folder {folder} of an interrupted build ({who})")
        removed.append(folder)
    return removed


def build_avmnist(
    mnist_dir: Path,
    fsdd_dir: Path,
    data_root: Path,
    seed: int = 0,
    noise_snr_db: float | None = 10.0,
    energy_kept: float = 0.25,
    name: str = "avmnist",
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Build ``data_root/name`` (see the module docstring); returns its path.

    Every input is read and checked before anything expensive runs, and the target is replaced only
    after the whole build succeeded. Staging folders of killed earlier builds are removed first.
    """
    mnist_dir, fsdd_dir, data_root = Path(mnist_dir), Path(fsdd_dir), Path(data_root)
    remove_stale_staging(data_root, name, log)
    mnist = {s: read_mnist(mnist_dir, s) for s in ("train", "test")}
    recordings = fsdd_dir / "recordings"
    clips = {"train": list_clips(recordings, TRAIN_SPEAKERS), "test": list_clips(recordings, TEST_SPEAKERS)}
    published = read_sums(fsdd_dir)
    check_fsdd_complete(fsdd_dir, published, TRAIN_SPEAKERS + TEST_SPEAKERS)
    sources = {s: pair_clips(mnist[s][1], clips[s], seed, s) for s in ("train", "test")}
    used = sorted({p for s in sources.values() for p in s})
    wavs = {p: read_wav(p) for p in used}
    hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in used}
    sums_sha = _check_against_sums(fsdd_dir, published, hashes)
    log(f"read MNIST ({len(mnist['train'][1])} + {len(mnist['test'][1])}) and {len(used)} FSDD clips")

    data_root.mkdir(parents=True, exist_ok=True)
    target = data_root / name
    files: dict[str, dict] = {}
    ks = {}
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
        # the owner lets a later build tell a killed build's leftovers from a running build's folder
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        (Path(tmp) / STAGING_OWNER).write_text(json.dumps(owner) + "\n")
        staging = Path(tmp) / name
        staging.mkdir()
        for s in ("train", "test"):
            images, labels, _ = mnist[s]
            image, ks[s] = pca_degrade(images, energy_kept)
            _save(staging, f"image/{s}_data.npy", image, files)
            log(f"{s}: PCA kept {ks[s]} components")
            _save(staging, f"audio/{s}_data.npy", make_audio(sources[s], wavs, seed, s, noise_snr_db), files)
            log(f"{s}: {len(labels)} spectrograms")
            _save(staging, f"{s}_labels.npy", labels, files)
            src = staging / "audio" / f"{s}_sources.txt"
            src.write_text("".join(p.name + "\n" for p in sources[s]))
            files[f"audio/{s}_sources.txt"] = {"sha256": sha256_file(src)}
        wav_lines = "".join(f"{hashes[p]}  {p.name}\n" for p in sorted(used, key=lambda p: p.name))
        cmd = f"python scripts/prepare_data.py avmnist --mnist MNIST_DIR --fsdd FSDD_DIR --seed {seed}"
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": "avmnist",
            "builder": "fusionbench.data.avmnist_build",
            "command": cmd + ("" if noise_snr_db is None else f" --noise-snr-db {noise_snr_db:g}"),
            "params": {
                "seed": seed,
                "noise_snr_db": noise_snr_db,
                "energy_kept": energy_kept,
                "pca_components": ks,
                "sample_rate": SAMPLE_RATE,
                "n_fft": N_FFT,
                "n_frames": N_FRAMES,
                "spectrogram": "boxcar window, frame starts round(linspace(0, len-222, 112)), clips "
                "zero-padded to 333, |rfft|, u8 = round(255 * log1p(|X|) / log1p(222 * 32768)) clipped "
                "to 0..255, layout [freq, time]",
                "train_speakers": list(TRAIN_SPEAKERS),
                "test_speakers": list(TEST_SPEAKERS),
            },
            "noise": NOISE_NOTE,
            "sources": {
                "mnist": {n: h for s in ("train", "test") for n, h in mnist[s][2].items()},
                "fsdd": {
                    "SHA256SUMS": sums_sha,
                    "wavs_used": len(used),
                    "wavs_sha256": hashlib.sha256(wav_lines.encode()).hexdigest(),
                    "clips_per_digit": {s: [len(clips[s][d]) for d in range(10)] for s in ("train", "test")},
                },
            },
            "files": files,
            "versions": {"numpy": np.__version__, "fusionbench": __version__},
        }
        (staging / "PROVENANCE.md").write_text(_provenance(manifest))
        files["PROVENANCE.md"] = {"sha256": sha256_file(staging / "PROVENANCE.md")}
        # written last: its presence marks a complete build
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        swap_into_place(staging, target, Path(tmp))
    return target


def swap_into_place(staging: Path, target: Path, tmp: Path) -> None:
    """Move a complete ``staging`` folder to ``target``; an existing ``target`` is parked in ``tmp`` (a
    temporary folder deleted on exit) and put back if the move fails, so ``target`` is never half-written."""
    previous = tmp / "previous"
    if target.exists():
        target.rename(previous)
    try:
        staging.rename(target)
    except OSError:
        if previous.exists():
            previous.rename(target)
        raise
