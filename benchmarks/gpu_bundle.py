"""Write data/gpu-bundle/: what benchmarks/gpu_verify.sh needs on a GPU machine that has torch and
triton but no network, small enough to travel with the working tree (the device tool carries at
most 64 MiB of ignored files; the raw MNIST files alone are 55 MB).

    python benchmarks/gpu_bundle.py            # = make gpu-bundle

* data/gpu-bundle/MNIST/raw/*-ubyte.gz: the four official MNIST idx files, provisioned by
  capstriton.data (checked by sha256) and gzipped (~11 MB); capstriton.data reads *-ubyte.gz.
* data/gpu-bundle/wheels/: pure-Python wheels of the test and package dependencies a bare
  torch + triton image may lack (pytest, pytest-xdist, einops, expecttest and theirs), fetched
  with pip once; gpu_verify.sh installs only the missing ones, offline.  Best effort: without
  network the wheels are skipped with a message and the script still succeeds.
"""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "data" / "gpu-bundle"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
# pure-Python (py3-none-any) wheels; exceptiongroup, tomli and typing_extensions serve pytest on Python 3.10
WHEELS = ("pytest", "pytest-xdist", "einops", "expecttest", "exceptiongroup", "tomli", "typing_extensions")


def gzip_mnist(data_dir: Path, out_dir: Path) -> list[Path]:
    """Gzip the provisioned idx files into out_dir (mtime 0: the same bytes on every run)."""
    from capstriton import data

    data.prepare_mnist(data_dir, log=print)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in MNIST_FILES:
        src, dst = data_dir / "MNIST" / "raw" / name, out_dir / f"{name}.gz"
        tmp = dst.with_suffix(".gz.tmp")
        with src.open("rb") as fin, open(tmp, "wb") as raw, gzip.GzipFile(name, "wb", 9, raw, mtime=0) as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)
        written.append(dst)
    return written


def download_wheels(out_dir: Path) -> bool:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--platform", "any",
           "--implementation", "py", "--python-version", "3.10", "-d", str(out_dir), *WHEELS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"wheels skipped: {exc}")
        return False
    if proc.returncode != 0:
        print("wheels skipped: pip download failed:\n" + (proc.stderr.strip().splitlines() or [""])[-1])
        return False
    return True


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> int:
    files = gzip_mnist(REPO / "data", BUNDLE / "MNIST" / "raw")
    for f in files:
        print(f"wrote {f.relative_to(REPO)} ({f.stat().st_size / 2**20:.1f} MiB)")
    if download_wheels(BUNDLE / "wheels"):
        print(f"wrote {(BUNDLE / 'wheels').relative_to(REPO)}/: "
              + ", ".join(sorted(p.name.split("-")[0] for p in (BUNDLE / "wheels").glob("*.whl"))))
    total = size_mb(BUNDLE)
    print(f"data/gpu-bundle: {total:.1f} MiB (the device tool carries at most 64 MiB)")
    print('device tool call: command "bash benchmarks/gpu_verify.sh --quick", carry ["data/gpu-bundle"], '
          "timeout_s 540 (docs/gpu/README.md)")
    return 0 if total < 64 else 1


if __name__ == "__main__":
    sys.exit(main())
