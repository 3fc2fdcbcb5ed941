"""`python -m and_dist.prepare`: a resized copy of an ImageFolder tree (flat val/ and its label
file too), killed midway and resumed to the same bytes as a run left alone."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ENV, REPO

from and_dist.data.sources.index import check_image

SIDE = 64


def make_tree(root: Path) -> Path:
    """2 classes of large noisy JPEGs (slow to decode: a kill lands midway), a small PNG, a flat val/
    labelled by a CSV at the root, and a corrupt file."""
    rng = np.random.default_rng(0)
    files = [f"train/n0000000{c}/{k:02d}.JPEG" for c in (1, 2) for k in range(24)] + \
            [f"val/ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 5)]
    for k, rel in enumerate(files):
        h, w = (1200, 1600) if k % 2 else (1500, 1000)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel, quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "train/n00000001/small.png")
    (root / "train/n00000002/corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{k:08d},n0000000{1 + k % 2} 1 2 3 4\n" for k in range(1, 5)))
    return root


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare(src: Path, dst: Path, **kw):
    cmd = [sys.executable, "-m", "and_dist.prepare", str(src), str(dst), f"--shorter-side={SIDE}", "--workers=1"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _wait_for_images(proc, dst: Path, n: int) -> None:
    """Until `n` JPEGs hold their final names in `dst` (or prepare ended)."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len([p for p in dst.rglob("*.JPEG") if not p.name.startswith(".")]) >= n:
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_prepare_killed_midway_resumes_to_the_output_of_a_run_left_alone(tmp_path, big_jpeg_tree):
    src = big_jpeg_tree                     # conftest: made once (make_tree below)
    alone = _prepare(src, tmp_path / "alone")
    out, _ = alone.communicate(timeout=120)
    assert alone.returncode == 0, out
    assert out.count("skipping unreadable image") == 1 and "corrupt.JPEG" in out
    want = _files(tmp_path / "alone")
    assert "train/n00000002/corrupt.JPEG" not in want and "LOC_val_solution.csv" in want
    assert not [name for name in want if Path(name).name.startswith(".")]
    for name in want:
        if name.endswith(".JPEG"):
            with Image.open(tmp_path / "alone" / name) as img:
                assert min(img.size) == SIDE and img.format == "JPEG"
    assert want["train/n00000001/small.png"] == (src / "train/n00000001/small.png").read_bytes()  # small: as is

    # Killed (the whole process group, workers included) once a few images are written.
    dst = tmp_path / "dst"
    proc = _prepare(src, dst, start_new_session=True)
    _wait_for_images(proc, dst, 6)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "prepare ended before it could be killed"
    partial = {n: b for n, b in _files(dst).items() if not Path(n).name.startswith(".")}
    assert 6 <= len([n for n in partial if n.endswith(".JPEG")]) < len([n for n in want if n.endswith(".JPEG")])
    for name, data in partial.items():            # what holds a final name is complete
        assert data == want[name], name
    resumed = _prepare(src, dst)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert _files(dst) == want
    images = [n for n in want if n.endswith((".JPEG", ".png"))]
    assert f"{len([n for n in partial if n in images])} kept" in out, out      # not redone
    assert all(check_image(str(dst / name))[3] is None for name in images)


@pytest.mark.slow
def test_prepare_stopped_by_sigterm_exits_143_leaves_no_part_and_continues(tmp_path, big_jpeg_tree):
    """SIGTERM (to the process, as a user's kill; SLURM's reaches the workers too) midway: exit
    128 + 15, no hidden part file left, every final name complete; the rerun finishes the copy."""
    src = big_jpeg_tree                     # conftest: made once (make_tree below)
    dst = tmp_path / "dst"
    proc = _prepare(src, dst, start_new_session=True)
    _wait_for_images(proc, dst, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out
    assert not [p for p in dst.rglob(".*")], "a part file was left"
    for p in dst.rglob("*.JPEG"):
        assert check_image(str(p))[3] is None, p
    again = _prepare(src, dst)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert len(list(dst.rglob("*.JPEG"))) == 24 * 2 + 4 and "kept" in out      # the corrupt one left out


def test_prepare_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    from and_dist.prepare import main
    for args in ([str(tmp_path / "none"), str(tmp_path / "out"), "--shorter-side=64"],
                 [str(tmp_path), str(tmp_path / "inside"), "--shorter-side=64"],
                 [str(tmp_path), str(tmp_path / "out"), "--shorter-side=0"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
