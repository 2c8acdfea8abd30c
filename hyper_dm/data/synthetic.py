"""Synthetic datasets written in the real LUNA16 and fastMRI knee single-coil formats.

No real data can be downloaded where the demo and the tests run, so these writers produce small seeded stand-ins
that the real-format readers (and SimpleITK / fastMRI's own ``SliceDataset``) load unchanged:

- :func:`write_luna16_like`: ``subset{k}/<seriesuid>.mhd`` + ``.raw`` (int16 HU, LPS geometry with per-series
  spacing and origin) and ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``, world mm) whose
  rows point at the centres of spherical nodules. Chest-like content: air (-1000 HU) inside a -2000 HU padding
  outside the scan circle, a patient table, subcutaneous fat, soft tissue, lungs near -850 HU with vessels,
  aorta, spine, sternum, ribs and 4-30 mm nodules.
- :func:`write_fastmri_knee_like`: ``knee_singlecoil_train/file_knee_<n>.h5`` with ``kspace`` ``[slices, 640, 368]``
  complex64 (centered orthonormal FFT of a complex knee-like image with 2x readout oversampling and thermal noise),
  ``reconstruction_esc`` ``[slices, 320, 320]`` float32 (the matching cropped magnitude), attrs
  ``acquisition``/``max``/``norm``/``patient_id`` and an ISMRMRD XML header that ``fastmri.data.SliceDataset`` parses.

Both are pure functions of ``seed`` and write ``datalist.json`` (Decathlon style) with the set's fixed split: the
last case is ``test``, the one before ``validation``, the rest ``training``. Example::

    >>> write_luna16_like("data/synthetic/luna16", n_series=6, seed=0)
    >>> write_fastmri_knee_like("data/synthetic/fastmri_knee", n_files=4, seed=0)
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from ..physics.mri import center_crop, fft2c, ifft2c
from .datalist import write_datalist

__all__ = ["KNEE_FOLDER", "LUNA16_ANNOTATION_COLUMNS", "write_challenge_like", "write_fastmri_knee_like",
           "write_luna16_like"]

LUNA16_ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
KNEE_FOLDER = "knee_singlecoil_train"
_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001"  # LIDC/LUNA16 series UID prefix


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Boolean mask of the ellipse ``((x - cx) / ax)^2 + ((y - cy) / ay)^2 <= 1`` (all in mm)."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _paint(img: np.ndarray, u: np.ndarray, v: np.ndarray, cx: float, cy: float, ax: float, ay: float,
           value: float) -> None:
    """Set the ellipse of centre ``(cx, cy)``, semi-axes ``(ax, ay)`` (mm) in ``img: [len(v), len(u)]`` to ``value``.

    ``u``/``v`` are the ascending column/row coordinates in mm; only the ellipse's bounding box is evaluated.
    """
    c0, c1 = np.searchsorted(u, [cx - ax, cx + ax])
    r0, r1 = np.searchsorted(v, [cy - ay, cy + ay])
    if c1 > c0 and r1 > r0:
        box = img[r0:r1, c0:c1]
        box[_ellipse(u[None, c0:c1], v[r0:r1, None], cx, cy, ax, ay)] = value


def _chest_slice_hu(base: np.ndarray, u: np.ndarray, v: np.ndarray, z: float, anatomy: dict) -> np.ndarray:
    """HU ``[ny, nx]`` of the axial slice ``z`` mm from the volume centre; ``u: [nx]``, ``v: [ny]`` in mm (LPS).

    ``base`` holds what does not change along z (padding outside the scan circle, air, table).
    """
    hu = base.copy()
    a, b = anatomy["body"]
    _paint(hu, u, v, 0, 0, a, b, -100.0)  # subcutaneous fat
    _paint(hu, u, v, 0, 0, a - 15, b - 15, 40.0)  # muscle / mediastinum
    lung_scale = np.sqrt(max(1.0 - (z / anatomy["lung_half_height"]) ** 2, 0.05))
    lx, ly = anatomy["lung_axes"]
    for side in (-1, 1):
        _paint(hu, u, v, side * anatomy["lung_dx"], -5, lx * lung_scale, ly * lung_scale, -850.0)
    for vx, vy, sx, sy, r in anatomy["vessels"]:
        _paint(hu, u, v, vx + sx * z, vy + sy * z, r, r, 40.0)
    _paint(hu, u, v, -20, 55, 13, 13, 45.0)  # descending aorta (posterior = +y in LPS)
    _paint(hu, u, v, 0, 90, 17, 15, 1100.0)  # vertebral body, cortical rim
    _paint(hu, u, v, 0, 90, 13, 11, 350.0)  # cancellous bone
    _paint(hu, u, v, 0, -b + 22, 14, 6, 500.0)  # sternum (anterior)
    for angle in np.linspace(0.25, np.pi - 0.25, 7):
        for side in (-1, 1):
            _paint(hu, u, v, side * (a - 20) * np.cos(angle), 10 - (b - 20) * np.sin(angle), 6, 5, 800.0)
    for cx, cy, cz, d in anatomy["nodules"]:
        r2 = (d / 2) ** 2 - (z - cz) ** 2
        if r2 > 0:
            _paint(hu, u, v, cx, cy, np.sqrt(r2), np.sqrt(r2), 80.0)  # solid nodule, denser than muscle
    return hu


def _chest_anatomy(rng: np.random.Generator, extent_z_mm: float) -> dict:
    """Random but plausible chest layout in mm relative to the volume centre (LPS axes)."""
    a, b = rng.uniform(140, 170), rng.uniform(105, 125)
    lung_axes = (rng.uniform(50, 60), rng.uniform(75, 90))
    lung_dx = rng.uniform(70, 80)
    anatomy = {
        "fov_radius": 175.0, "table_y": b + 8, "body": (a, b), "lung_axes": lung_axes, "lung_dx": lung_dx,
        "lung_half_height": extent_z_mm * rng.uniform(0.8, 1.2),
        "vessels": [], "nodules": [],
    }
    for _ in range(8):
        side = rng.choice([-1, 1])
        anatomy["vessels"].append((side * lung_dx + rng.uniform(-30, 30), rng.uniform(-40, 40),
                                   rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(1.5, 3.5)))
    for _ in range(rng.integers(1, 4)):
        d = float(rng.uniform(4.0, 30.0))
        cz = float(rng.uniform(-0.3, 0.3) * extent_z_mm)
        scale = np.sqrt(max(1.0 - (cz / anatomy["lung_half_height"]) ** 2, 0.05))
        room = (lung_axes[0] * scale - d / 2 - 2, lung_axes[1] * scale - d / 2 - 2)
        t, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.5))
        side = rng.choice([-1, 1])
        cx = side * lung_dx + rad * max(room[0], 0) * np.cos(t)
        cy = -5 + rad * max(room[1], 0) * np.sin(t)
        anatomy["nodules"].append((float(cx), float(cy), cz, d))
    return anatomy


def write_luna16_like(
    out_dir: str | Path,
    n_series: int = 6,
    seed: int = 0,
    size_xy: int = 512,
    n_slices: tuple[int, int] = (24, 40),
    spacing_xy_mm: tuple[float, float] = (0.62, 0.78),
    spacing_z_mm: Sequence[float] = (1.25, 1.5, 2.0, 2.5),
    direction: Sequence[float] = _IDENTITY,
    n_subsets: int = 2,
) -> list[Path]:
    """Write ``n_series`` chest-like CT series in the LUNA16 layout; return the ``.mhd`` paths.

    Args:
        out_dir: dataset root; gets ``subset{k}/`` folders and ``annotations.csv``.
        n_series: number of series (one per synthetic patient).
        seed: everything is a deterministic function of it.
        size_xy: in-plane matrix (LUNA16: 512).
        n_slices: ``(min, max)`` number of axial slices per series.
        spacing_xy_mm: range the in-plane pixel spacing (mm) is drawn from, per series.
        spacing_z_mm: slice spacings (mm) drawn from, per series.
        direction: ITK direction cosines (row-major 3 x 3) of every series; LUNA16 uses the identity.
        n_subsets: series are spread over ``subset0 .. subset{n_subsets-1}``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    dir_matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    paths, rows = [], []
    for i in range(n_series):
        nz = int(rng.integers(n_slices[0], n_slices[1] + 1))
        sxy = float(rng.uniform(*spacing_xy_mm))
        sz = float(rng.choice(list(spacing_z_mm)))
        spacing = np.array([sxy, sxy, sz])
        extent = spacing * np.array([size_xy, size_xy, nz])
        centre = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20) + 10, rng.uniform(-250, -100)])
        origin = centre - dir_matrix @ (spacing * (np.array([size_xy, size_xy, nz]) - 1) / 2)
        anatomy = _chest_anatomy(rng, extent[2] / 2)
        uid = f"{_UID_ROOT}.{seed}{i:03d}{int(rng.integers(10**11, 10**12))}"

        u = (np.arange(size_xy) - (size_xy - 1) / 2) * sxy  # mm from the centre along the index axes
        base = np.full((size_xy, size_xy), -1000.0)
        base[u[None, :] ** 2 + u[:, None] ** 2 > anatomy["fov_radius"] ** 2] = -2000.0  # outside the scan circle
        _paint(base, u, u, 0, anatomy["table_y"] + 6, 200, 6, 150.0)  # patient table
        texture = 40.0 * gaussian_filter(rng.standard_normal((size_xy, size_xy)), 1.0)
        volume = np.empty((nz, size_xy, size_xy), dtype=np.int16)  # SimpleITK array order [z, y, x]
        for k in range(nz):
            hu = _chest_slice_hu(base, u, u, (k - (nz - 1) / 2) * sz, anatomy)
            inside = hu > -1500
            hu[inside] += np.roll(texture, int(rng.integers(size_xy)), axis=int(k % 2))[inside]
            volume[k] = np.clip(np.rint(hu), -3024, 3071).astype(np.int16)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing(spacing.tolist())
        image.SetOrigin(origin.tolist())
        image.SetDirection(dir_matrix.ravel().tolist())
        path = out / f"subset{i % n_subsets}" / f"{uid}.mhd"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
        paths.append(path)
        for cx, cy, cz, d in anatomy["nodules"]:
            world = centre + dir_matrix @ np.array([cx, cy, cz])
            rows.append([uid, *(f"{v:.6f}" for v in world), f"{d:.6f}"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "annotations.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LUNA16_ANNOTATION_COLUMNS)
        writer.writerows(rows)
    write_datalist(out, _fixed_splits(paths))
    return paths


def _knee_magnitude(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """Knee-like proton-density magnitude images ``[n_slices, 320, 320]`` (coronal, 140 mm FOV) in [0, ~1]."""
    r, c = np.meshgrid(np.linspace(-70, 70, 320), np.linspace(-70, 70, 320), indexing="ij")  # mm, rows = readout
    out = np.zeros((n_slices, 320, 320))
    width = rng.uniform(42, 50)
    gap = rng.uniform(3.0, 5.0)
    for s in range(n_slices):
        t = (s - (n_slices - 1) / 2) / max(n_slices, 1)
        w = width * np.sqrt(max(1 - (2.2 * t) ** 2, 0.2))
        img = np.where(_ellipse(r, c, 0, 0, 75, w + 12), 0.95, 0.0)  # subcutaneous fat (bright in PD)
        img[_ellipse(r, c, 0, 0, 75, w + 6)] = 0.45  # muscle
        femur = _ellipse(r, c, -35 - gap, 0, 38, w) & (r < -gap)
        tibia = _ellipse(r, c, 35 + gap, 0, 38, w * 0.95) & (r > gap)
        for bone in (femur, tibia):
            img[bone] = 0.25  # cortical rim (dark)
            img[bone & ~(np.abs(gaussian_filter(bone.astype(float), 4) - 0.5) > 0.45)] = 0.25
            inner = gaussian_filter(bone.astype(float), 3) > 0.9
            img[inner] = 0.8  # fatty marrow
        cartilage = (np.abs(np.abs(r) - gap) < 2.2) & (np.abs(c) < w * 0.85)
        img[cartilage] = 0.65
        for side in (-1, 1):
            img[_ellipse(r, c, 0, side * w * 0.75, 2.5, 9)] = 0.05  # menisci (dark)
        texture = gaussian_filter(rng.standard_normal(img.shape), 2.0)
        out[s] = np.clip(img * (1 + 0.15 * texture / texture.std()), 0, None) * (img > 0)
        out[s] = gaussian_filter(out[s], 0.8)
    return out


def _ismrmrd_header(n_slices: int) -> bytes:
    """Minimal ISMRMRD XML header with the fields fastMRI reads (knee single-coil geometry)."""
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <encoding>
    <encodedSpace>
      <matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>280.0</x><y>161.0</y><z>4.5</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>140.0</x><y>140.0</y><z>3.0</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>367</maximum><center>184</center></kspace_encoding_step_1>
      <slice><minimum>0</minimum><maximum>{n_slices - 1}</maximum><center>{n_slices // 2}</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
""".encode()


def write_fastmri_knee_like(
    out_dir: str | Path,
    n_files: int = 4,
    seed: int = 0,
    n_slices: tuple[int, int] = (6, 8),
    noise_rel: float = 0.01,
) -> list[Path]:
    """Write ``n_files`` single-coil knee files in the fastMRI ``.h5`` format; return their paths.

    Args:
        out_dir: dataset root: the files go to ``knee_singlecoil_train/file_knee_<n>.h5`` (a folder fastMRI's
            ``SliceDataset`` reads), ``datalist.json`` beside it.
        n_files: number of files (one synthetic patient each).
        seed: everything is a deterministic function of it.
        n_slices: ``(min, max)`` slices per file.
        noise_rel: complex thermal noise standard deviation relative to the image maximum.
    """
    out = Path(out_dir)
    (out / KNEE_FOLDER).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_files):
        ns = int(rng.integers(n_slices[0], n_slices[1] + 1))
        magnitude = _knee_magnitude(rng, ns) * rng.uniform(1e-4, 4e-4)  # fastMRI single-coil magnitudes ~1e-4
        r, c = np.meshgrid(np.linspace(-1, 1, 320), np.linspace(-1, 1, 320), indexing="ij")
        phase = rng.uniform(-1, 1) * r + rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * r * c
        image = np.zeros((ns, 640, 368), dtype=np.complex128)  # 2x readout oversampling, 368 phase encodes
        image[:, 160:480, 24:344] = magnitude * np.exp(1j * phase)
        sigma = noise_rel * magnitude.max() / np.sqrt(2)
        image += sigma * (rng.standard_normal(image.shape) + 1j * rng.standard_normal(image.shape))
        kspace = fft2c(image).astype(np.complex64)
        esc = np.abs(center_crop(ifft2c(kspace), (320, 320))).astype(np.float32)
        path = out / KNEE_FOLDER / f"file_knee_{seed:02d}{i:04d}.h5"
        with h5py.File(path, "w") as hf:
            hf.create_dataset("kspace", data=kspace)
            hf.create_dataset("reconstruction_esc", data=esc)
            hf.create_dataset("ismrmrd_header", data=_ismrmrd_header(ns))
            hf.attrs["acquisition"] = "CORPD_FBK" if i % 2 == 0 else "CORPDFS_FBK"
            hf.attrs["max"] = float(esc.max())
            hf.attrs["norm"] = float(np.linalg.norm(esc))
            hf.attrs["patient_id"] = rng.bytes(8).hex()
        paths.append(path)
    write_datalist(out, _fixed_splits(paths))
    return paths


def _fixed_splits(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """The synthetic sets' own split: the last case is ``test``, the one before ``validation`` (with 3 or more)."""
    paths = list(paths)
    if len(paths) < 3:
        return {"training": paths, "validation": [], "test": []}
    return {"training": paths[:-2], "validation": paths[-2:-1], "test": paths[-1:]}


def write_challenge_like(source: str | Path, out_path: str | Path, acceleration: int = 4,
                         center_fraction: float = 0.08, seed: int = 0) -> Path:
    """Copy a fully sampled single-coil file as a fastMRI challenge (test-set) file: ``kspace`` undersampled by a
    random mask, the ``mask`` dataset, attrs ``acceleration``/``num_low_frequency``, no ``reconstruction_esc``."""
    from ..physics.mri import make_mask_func, undersample  # fastMRI is the optional [mri] extra

    mask_func = make_mask_func("random", [center_fraction], [acceleration])
    with h5py.File(source, "r") as hf:
        kspace, header = hf["kspace"][()], hf["ismrmrd_header"][()]
        attrs = {k: hf.attrs[k] for k in ("acquisition", "patient_id") if k in hf.attrs}
    mask = undersample(kspace[0], mask_func, seed)[1]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out_path, "w") as hf:
        hf.create_dataset("kspace", data=(kspace * mask).astype(np.complex64))
        hf.create_dataset("mask", data=mask)
        hf.create_dataset("ismrmrd_header", data=header)
        hf.attrs.update({**attrs, "acceleration": acceleration, "num_low_frequency": int(round(center_fraction
                                                                                            * len(mask)))})
    return out_path


def insert_dense_disc(mhd: str | Path, out: str | Path, centre_lps: Sequence[float] | None = None,
                      radius_mm: float = 15.0, hu: float = 900.0) -> np.ndarray:
    """Write the CT series ``mhd`` with an object no training case has: a dense disc striped ``hu`` / ``hu - 600``
    HU in 3 mm bands, through every axial slice, around ``centre_lps`` (world mm; default: the patient's right lung,
    32% / 45% across the slice). ``out`` is any format SimpleITK writes (``.nii.gz``: a user's study). Returns the
    disc mask ``[X, Y, Z]`` in the file's voxel order. Assumes LUNA16's identity direction."""
    def disc(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return dx**2 + dy**2 <= radius_mm**2, hu - 600.0 * (np.floor(dx / 3.0) % 2)

    return _paint_ct_object(mhd, out, centre_lps, disc)


def insert_checkered_square(mhd: str | Path, out: str | Path, centre_lps: Sequence[float] | None = None,
                            side_mm: float = 30.0, cell_mm: float = 4.0, hu: tuple[float, float] = (700.0, 100.0)
                            ) -> np.ndarray:
    """Like :func:`insert_dense_disc`, another unfamiliar object of another shape and texture: a square of side
    ``side_mm`` checkered ``hu`` in ``cell_mm`` cells, axis-aligned, in the same place by default. Returns its mask
    ``[X, Y, Z]``."""
    def square(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        checker = (np.floor(dx / cell_mm) + np.floor(dy / cell_mm)) % 2
        return np.maximum(abs(dx), abs(dy)) <= side_mm / 2, np.where(checker == 0, *hu)

    return _paint_ct_object(mhd, out, centre_lps, square)


def _paint_ct_object(mhd: str | Path, out: str | Path, centre_lps: Sequence[float] | None,
                     paint: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Write ``mhd`` to ``out`` with ``paint(dx, dy) -> (inside [X, Y] bool, HU [X, Y])`` (offsets in world mm from
    ``centre_lps``) set on every axial slice; returns the mask ``[X, Y, Z]``."""
    image = sitk.ReadImage(str(mhd))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    size, origin, spacing = np.asarray(image.GetSize()), np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    if centre_lps is None:
        centre_lps = origin + np.array([0.32, 0.45, 0.0]) * size * spacing
    x, y = (origin[k] + np.arange(size[k]) * spacing[k] for k in (0, 1))
    xx, yy = np.meshgrid(x, y, indexing="ij")  # [X, Y] world mm
    inside, hu = paint(xx - centre_lps[0], yy - centre_lps[1])
    volume[:, inside.T] = hu.T[inside.T]
    objected = sitk.GetImageFromArray(volume)
    objected.CopyInformation(image)
    sitk.WriteImage(objected, str(out))
    return np.repeat(inside[:, :, None], volume.shape[0], axis=2)


def insert_bright_lesion(h5: str | Path, out: str | Path, radius_mm: float = 6.0) -> np.ndarray:
    """Write the fastMRI file ``h5`` with an object no training case has: a bright disc striped in 2 mm bands (1.2x
    and 0.6x the file's maximum), left of centre on every slice, added to the image behind its ``kspace`` and
    ``reconstruction_esc``. Returns the disc mask ``[320, 320, Z]`` on the reconstruction grid (the loaded volume's
    x, y, z)."""
    def lesion(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray, peak: float) -> tuple[np.ndarray, np.ndarray]:
        return dx**2 + dy**2 <= radius_mm**2, magnitude + 1.2 * peak * (1 - 0.5 * (np.floor(dx / 2.0) % 2))

    return _paint_knee_object(h5, out, lesion)


def insert_checkered_knee_square(h5: str | Path, out: str | Path, side_mm: float = 12.0, cell_mm: float = 4.0
                                 ) -> np.ndarray:
    """Like :func:`insert_bright_lesion`, another unfamiliar object of another shape and texture: the tissue in a
    square of side ``side_mm`` replaced by ``cell_mm`` checkers of 0.9x the file's maximum and signal void, in the
    same place. The default cells are about twice the pixel of a 64 x 64 model grid on the 140 mm field of view,
    so a model on that grid can draw them (finer checkers test its resolution, not its EU). Returns its mask
    ``[320, 320, Z]``."""
    def square(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray, peak: float) -> tuple[np.ndarray, np.ndarray]:
        checker = (np.floor(dx / cell_mm) + np.floor(dy / cell_mm)) % 2
        return np.maximum(abs(dx), abs(dy)) <= side_mm / 2, np.where(checker == 0, 0.9 * peak, 0.0)

    return _paint_knee_object(h5, out, square)


def _paint_knee_object(h5: str | Path, out: str | Path,
                       paint: Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]
                       ) -> np.ndarray:
    """Write ``h5`` to ``out`` with the image behind its k-space set to ``paint(dx, dy, magnitude, peak) -> (inside
    [rows, cols] bool, new magnitude)`` inside, on every slice (``dx, dy [rows, cols]``: mm from a point 20% of the
    crop left of centre; ``magnitude [Z, rows, cols]``; ``peak``: the file's maximum; the tissue's phase kept), and
    ``reconstruction_esc`` and ``max`` to match; returns the mask ``[320, 320, Z]``."""
    with h5py.File(h5, "r") as src:
        kspace, esc, header, attrs = src["kspace"][()], src["reconstruction_esc"][()], src["ismrmrd_header"][()], \
            dict(src.attrs)
    pixel_mm = 140.0 / esc.shape[-1]  # fastMRI knee: a 140 mm field of view on the 320 crop
    rows, cols = kspace.shape[-2:]
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    dx, dy = (x - (cols / 2 - 0.2 * esc.shape[-1])) * pixel_mm, (y - rows / 2) * pixel_mm
    image = ifft2c(kspace)
    inside, magnitude = paint(dx, dy, np.abs(image), float(np.abs(esc).max()))
    inside = np.broadcast_to(inside, image.shape)
    image = np.where(inside, magnitude * np.exp(1j * np.angle(image)), image)
    crop = center_crop(image, esc.shape[-2:])
    with h5py.File(out, "w") as dst:
        dst.create_dataset("kspace", data=fft2c(image).astype(np.complex64))
        dst.create_dataset("reconstruction_esc", data=np.abs(crop).astype(np.float32))
        dst.create_dataset("ismrmrd_header", data=header)
        dst.attrs.update({**attrs, "max": float(np.abs(crop).max())})
    mask = center_crop(inside, esc.shape[-2:])  # [Z, 320, 320]
    return np.ascontiguousarray(mask.transpose(1, 2, 0))
