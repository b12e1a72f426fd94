"""What a bare GPU node lacks for the kit, bundled on this machine for one that reaches no package index.

    python -m benchmarks.gpu_bundle .gpu_bundle                 # here, for the node's Python (default 3.12)
    BUNDLE=.gpu_bundle bash scripts/gpu_check.sh OUT ...        # there: the bundle on the import and library paths

The GPU node the project is checked on has torch, torchvision, accelerate, timm, numba and OpenCV, but
not pydantic or ffcv, and no route to a package index; a device call carries at most 64 MiB. The bundle:

* ``site/``: pydantic's compiled core as the wheel for the node's Python (the one download), and, copied
  from this environment's files, pydantic, ffcv and the pure-Python packages they need. ffcv's one
  compiled file, ``_libffcv``, is loaded through ctypes and uses a single function of Python's C API
  (``PyModule_Create2``), so it loads under any Python 3 once named as a stable-ABI module;
* ``lib/``: the shared libraries ``_libffcv`` links (OpenCV core and imgproc, libjpeg-turbo, and
  theirs), but not the C and C++ runtimes: the node's own, newer ones serve those, and an older
  ``libstdc++`` ahead of them on the library path would break torch.

DALI stays out: its wheel (476 MB) is far over what a call can carry.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

CARRY_LIMIT = 64 * 2**20
COPIED = ("assertpy", "fastargs", "terminaltables", "pytorch-pfn-extras",  # ffcv's pure-Python needs
          "pydantic", "annotated-types", "typing-inspection", "typing-extensions")
DOWNLOADED = ("pydantic-core",)  # compiled for one Python version: fetched for the node's
RUNTIMES = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libstdc++", "libgcc_s", "libpthread", "libdl.so",
            "librt.so", "libz.so")


def copy_distribution(name: str, site: Path) -> None:
    """Copies an installed distribution's files (its RECORD) into ``site``, byte code left out."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files or []:
        if "__pycache__" in file.parts or file.parts[0] == "..":  # console scripts live outside site-packages
            continue
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(file), target)


def linked_libraries(shared_object: Path) -> list[Path]:
    """The libraries ``shared_object`` loads, as ``ldd`` resolves them here, less the C and C++ runtimes."""
    listing = subprocess.run(["ldd", str(shared_object)], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        name, arrow, *rest = line.split() + [""]
        if arrow == "=>" and rest[0].startswith("/") and not name.startswith(RUNTIMES):
            found.append(Path(rest[0]))
    return found


def bundle_ffcv(site: Path, lib: Path) -> None:
    copy_distribution("ffcv", site)
    extension = next((site / "ffcv").glob("_libffcv*.so"))
    extension = extension.rename(extension.with_name("_libffcv.abi3.so"))
    lib.mkdir(parents=True, exist_ok=True)
    for path in linked_libraries(extension):
        shutil.copy2(path.resolve(), lib / path.name)  # under its soname, as the loader asks for it


def download_wheels(site: Path, python: str) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in DOWNLOADED]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--target", str(site), "--python-version", python, "--implementation", "cp",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", *pins], check=True)


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path, python: str, wheels: bool = True) -> int:
    """Builds the bundle in a temporary folder beside ``out``, then moves it into place; returns its bytes."""
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    site, lib = work / "site", work / "lib"
    bundle_ffcv(site, lib)
    for name in COPIED:
        copy_distribution(name, site)
    if wheels:
        download_wheels(site, python)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return size_of(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path(".gpu_bundle"))
    p.add_argument("--python", default="3.12", help="the node's Python version (the kit's H100/H200: 3.12)")
    p.add_argument("--no-wheels", action="store_true",
                   help="copy only (pydantic's core left out: for a node that has pydantic, or a check here)")
    args = p.parse_args(argv)
    for name in ("ffcv", *COPIED):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            print(f"gpu_bundle: error: {name} is not installed here (run scripts/bootstrap.sh)", file=sys.stderr)
            return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"gpu_bundle: error: {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        size = build(args.out.resolve(), args.python, wheels=not args.no_wheels)
    except subprocess.CalledProcessError as exc:  # pip without an index, or ldd refusing the file
        shutil.rmtree(args.out.resolve().with_name(args.out.name + ".tmp"), ignore_errors=True)
        print(f"gpu_bundle: error: {' '.join(exc.cmd[:4])} ... failed (exit status {exc.returncode}); "
              f"{args.out} is left as it was", file=sys.stderr)
        return 2
    print(f"gpu_bundle: {args.out} holds {size / 2**20:.1f} MiB "
          f"({'within' if size <= CARRY_LIMIT else 'OVER'} the 64 MiB a device call carries)")
    return 0 if size <= CARRY_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
