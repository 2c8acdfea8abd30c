"""Atomic writes, safe output names and the no-overwrite check (real files, real nibabel)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from hyper_dm.io import atomic_write, check_no_overwrite, output_path, safe_stem


@pytest.mark.parametrize("name", ["../evil", "/abs", "", "   ", ".", "..", "a/b", "a\\b", ".hidden", "a\nb", "x" * 201])
def test_safe_stem_rejects_names_that_leave_the_directory(name):
    with pytest.raises(ValueError, match="cannot be used as an output file name"):
        safe_stem(name)


@pytest.mark.parametrize(
    ("name", "stem"),
    [("subset0_1.3.6.1.4", "subset0_1.3.6.1.4"), ("file1000001", "file1000001"), ("knee file:1", "knee_file_1")],
)
def test_safe_stem_keeps_case_ids(name, stem):
    assert safe_stem(name) == stem


def test_output_path_stays_inside(tmp_path):
    path = output_path(tmp_path, "subset0_1.3.6.1.4", "_mean.nii.gz")
    assert path == tmp_path.resolve() / "subset0_1.3.6.1.4_mean.nii.gz"
    with pytest.raises(ValueError, match="outside the output directory"):
        output_path(tmp_path, "..", "")
    with pytest.raises(ValueError, match="outside the output directory"):
        output_path(tmp_path / "out", "../x", ".png")


def test_output_path_refuses_symlink_out_of_the_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case_mean.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(ValueError, match="outside the output directory"):
        output_path(tmp_path / "out", "case", "_mean.nii.gz")


def test_atomic_write_nifti_and_json(tmp_path):
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    with atomic_write(tmp_path / "vol.nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".vol.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), affine), tmp)
    with atomic_write(tmp_path / "m.json") as tmp:
        tmp.write_text(json.dumps({"a": 1}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "vol.nii.gz"]
    image = nib.load(tmp_path / "vol.nii.gz")
    assert image.shape == (4, 4, 2) and np.allclose(image.affine, affine)
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}


def test_atomic_write_error_leaves_nothing_behind(tmp_path):
    target = tmp_path / "vol.nii.gz"
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []

    target.write_text("earlier result")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "earlier result"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_write_uses_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.csv") as tmp:
            tmp.write_text("x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644


def test_check_no_overwrite(tmp_path):
    existing, fresh = tmp_path / "c_mean.nii.gz", tmp_path / "c_eu.nii.gz"
    existing.write_bytes(b"")
    check_no_overwrite([fresh], overwrite=False, section="findings")
    check_no_overwrite([existing, fresh], overwrite=True, section="findings")
    hint = r"--overwrite \(python scripts/findings\.py\), --findings_cfg#overwrite True"
    with pytest.raises(FileExistsError, match=r"c_mean\.nii\.gz.*" + hint):
        check_no_overwrite([fresh, existing], overwrite=False, section="findings")


def test_a_training_folder_is_claimed_once_per_process_and_refused_to_another(tmp_path):
    """A later run in the same process (a notebook cell run again) keeps the lock it holds; another process is
    refused while it is held; and the same process still may not train over a run's model.pt."""
    import subprocess
    import sys

    from hyper_dm.engines import claim_training_folder

    out = tmp_path / "runs"
    parts = (out, out / "checkpoints", out / "logs")
    claim_training_folder(*parts)
    claim_training_folder(*parts)  # again in this process: no "another run (process <own pid>)"
    other = subprocess.run([sys.executable, "-c", "import sys; from hyper_dm.engines import claim_training_folder;"
                            " claim_training_folder(*sys.argv[1:])", *map(str, parts)], capture_output=True, text=True)
    assert other.returncode != 0
    assert f"another run (process {os.getpid()}) is writing into {out.resolve()}" in other.stderr, other.stderr
    (out / "model.pt").write_bytes(b"a finished run's model")
    with pytest.raises(FileExistsError, match="holds another run's"):
        claim_training_folder(*parts)


def test_a_claim_removes_event_files_a_failed_start_left_and_keeps_a_runs_curves(tmp_path):
    """A SummaryWriter that was created and closed before any step (a config error while the trainer was built)
    leaves an event file holding only its version record: not another run's, so the claim removes it; a file with
    one scalar is a run's curve and is refused."""
    from torch.utils.tensorboard import SummaryWriter

    from hyper_dm.engines import claim_training_folder

    out = tmp_path / "runs"
    SummaryWriter(log_dir=str(out / "logs")).close()
    claim_training_folder(out, out / "checkpoints", out / "logs")
    assert not list((out / "logs").glob("events.out.tfevents.*"))
    writer = SummaryWriter(log_dir=str(out / "logs"))
    writer.add_scalar("train/loss", 0.5, 1)
    writer.close()
    with pytest.raises(FileExistsError, match=r"holds another run's .*events\.out\.tfevents"):
        claim_training_folder(out, out / "checkpoints", out / "logs")
