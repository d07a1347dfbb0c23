"""NYU Depth V2 fixtures in the real formats: the official labeled ``.mat`` (MATLAB v7.3 = HDF5, arrays
stored transposed, with the official dataset names), a ``splits.mat`` (MATLAB v5, ``trainNdxs`` /
``testNdxs``), and the prepared ESANet layout written from them by the real prepare step.

Smoke-train on one (from the repository root):

    PYTHONPATH=tests python -c "from nyuv2_fixture import nyuv2_fixture_dir as f; print(f('/tmp/nyu'))"
    python train.py dataset=nyuv2 dataset.data_dir=/tmp/nyu/nyuv2 dataset.height=24 dataset.width=32 \
        dataset.num_samples=null dataset.num_workers=0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# raw NYU class id -> (40-class id, 13-class id), by hand from classMapping40.mat / class13Mapping.mat
# (classes.json: map_894_to_40[raw - 1], map_40_to_13[c40 - 1])
RAW_CLASSES = {0: (0, 0), 21: (1, 12), 11: (2, 5), 3: (3, 6), 5: (5, 4), 4: (22, 3), 1: (40, 7)}
RAW_IDS = tuple(RAW_CLASSES)  # block k of a frame holds RAW_IDS[(k + frame) % 7]
COLOURS = {
    raw: (40 * k + 10, 255 - 30 * k, (97 * k) % 256) for k, raw in enumerate(RAW_IDS)
}  # rgb = f(label)
DEPTH_M = {raw: 0.5 + 0.25 * k for k, raw in enumerate(RAW_IDS)}  # exact in binary: mm = 500 + 250 k


def frame_arrays(index: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Frame ``index`` (0-based) as (H, W[, 3]) arrays: vertical stripes of 7 raw classes (shifted per
    frame), colour and depth functions of the class; raw depth is the refined one with a hole (0)."""
    cols = np.arange(width) * len(RAW_IDS) // width
    raw_row = np.array([RAW_IDS[(k + index) % len(RAW_IDS)] for k in cols], dtype=np.uint16)
    labels = np.repeat(raw_row[None, :], height, axis=0)
    rgb = np.array([COLOURS[int(r)] for r in raw_row], dtype=np.uint8)[None].repeat(height, axis=0)
    depth = np.vectorize(DEPTH_M.get)(labels).astype(np.float32)
    raw = depth.copy()
    raw[: max(1, height // 4), : max(1, width // 4)] = 0.0  # missing Kinect readings
    return {"images": rgb, "depths": depth, "rawDepths": raw, "labels": labels}


def write_labeled_mat(
    path: Path, n_frames: int, height: int = 30, width: int = 40, drop: str | None = None
) -> Path:
    """A tiny ``nyu_depth_v2_labeled.mat``: MATLAB v7.3 (HDF5 with the 512-byte MATLAB header), datasets
    ``images`` (N, 3, W, H) uint8, ``depths`` / ``rawDepths`` (N, W, H) float32 metres, ``labels`` (N, W, H)
    uint16, as h5py shows the official file (MATLAB writes column-major, so H and W appear swapped).
    ``drop`` leaves one dataset out (to test the error)."""
    import h5py

    frames = [frame_arrays(i, height, width) for i in range(n_frames)]
    path = Path(path)
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=np.stack([fr["images"].transpose(2, 1, 0) for fr in frames]))
        for key in ("depths", "rawDepths", "labels"):
            f.create_dataset(key, data=np.stack([fr[key].T for fr in frames]))
        f.create_dataset("sceneTypes", data=np.zeros((1, n_frames), dtype=np.uint64))  # a field we ignore
        if drop:
            del f[drop]
    header = (
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    )
    with open(path, "r+b") as fh:  # MATLAB's text header in the user block, as in the official file
        fh.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")
    return path


def write_splits_mat(path: Path, train: list[int], test: list[int]) -> Path:
    """``splits.mat`` as the official one: MATLAB v5, ``trainNdxs`` / ``testNdxs`` (n x 1) uint16, 1-based."""
    from scipy.io import savemat

    savemat(
        path,
        {
            "trainNdxs": np.asarray(train, dtype=np.uint16).reshape(-1, 1),
            "testNdxs": np.asarray(test, dtype=np.uint16).reshape(-1, 1),
        },
    )
    return Path(path)


def nyuv2_fixture_dir(
    root: str | Path, n_train: int = 4, n_test: int = 2, height: int = 30, width: int = 40
) -> Path:
    """Write a tiny .mat and split into ``root`` and run the real prepare step on them; returns the
    prepared folder ``root/nyuv2`` (train frames 1..n_train, test frames after them)."""
    from fusionbench.data.nyuv2 import prepare_nyuv2

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mat = write_labeled_mat(root / "nyu_depth_v2_labeled.mat", n_train + n_test, height, width)
    splits = write_splits_mat(
        root / "splits_fixture.mat",
        list(range(1, n_train + 1)),
        list(range(n_train + 1, n_train + n_test + 1)),
    )
    return prepare_nyuv2(mat, root, splits=splits)
