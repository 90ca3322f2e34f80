"""transformers' own common test files, of the installed (pinned) version, fetched from its source distribution.

The files are never committed: the first test session downloads the sdist with `pip download` (PyPI), extracts its
`tests/` into a cache directory (`$FSGR_PMA_UPSTREAM_TESTS_DIR`, default `~/.cache/fsgr-pma/`), and imports
`test_modeling_common` and `test_configuration_common` from there as the package `transformers_tests_<version>`.
Without network or pip the tests that need them are skipped with the reason; `FSGR_PMA_REQUIRE_UPSTREAM_TESTS=1`
(set by `.ci/run`) makes that a failure.

The sdist's `tests/` holds the common mixins but not the folders they import from: `generation/test_utils.py`
(`GenerationTesterMixin`), `exporters/test_export.py` (`ExportTesterMixin`) and `utils/test_configuration_utils.py`
(`config_common_kwargs`). They are replaced by empty stand-ins (no tests), so `GenerationTesterMixin` is not run;
the generation contract is covered by this repository's own tests (`test_cache.py`, `test_modeling_fsgr_pma.py`).
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import transformers

VERSION = transformers.__version__
PACKAGE = "transformers_tests_" + VERSION.replace(".", "_")
REQUIRED = os.environ.get("FSGR_PMA_REQUIRE_UPSTREAM_TESTS") == "1"
FILES = ("test_modeling_common.py", "test_configuration_common.py")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fsgr-pma"
    return Path(os.environ.get("FSGR_PMA_UPSTREAM_TESTS_DIR", default))


def _pip_download(destination: Path) -> Path:
    """`pip download transformers==VERSION --no-binary :all: --no-deps`; the sdist's path."""
    spec = [f"transformers=={VERSION}", "--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(destination)]
    errors = []
    for python in dict.fromkeys([sys.executable, shutil.which("python3") or "python3"]):
        result = subprocess.run([python, "-m", "pip", "download", *spec], capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return next(destination.glob(f"transformers-{VERSION}.tar.gz"))
        errors.append(f"{python} -m pip download: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    raise RuntimeError("; ".join(errors))


def _fetch(target: Path) -> None:
    """Extract the sdist's `tests/*.py` into `target` (atomically: a half-written copy is never used)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = _pip_download(Path(tmp))
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(sdist) as archive:
            prefix = f"transformers-{VERSION}/tests/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name.endswith(".py")]
            for member in members:
                member.name = member.name[len(prefix) :]
                archive.extract(member, staging, filter="data")
        missing = [name for name in FILES if not (staging / name).exists()]
        if missing:
            raise RuntimeError(f"the transformers {VERSION} sdist has no tests/{', tests/'.join(missing)}")
        (staging / "__init__.py").touch()
        staging.rename(target)


def _stand_ins(target: Path) -> None:
    """Empty modules for the folders the sdist lacks, registered before the common files import them."""
    parts = {
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        "utils.test_configuration_utils": {"config_common_kwargs": None},  # check_config_arguments_init is not run
    }
    for dotted, attributes in parts.items():
        folder, module_name = dotted.split(".")
        if (target / folder / f"{module_name}.py").exists():  # a later sdist may ship the real one
            continue
        package = sys.modules.setdefault(f"{PACKAGE}.{folder}", types.ModuleType(f"{PACKAGE}.{folder}"))
        package.__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{dotted}")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """`test_modeling_common` and `test_configuration_common` of the installed transformers; skips (or, with
    `FSGR_PMA_REQUIRE_UPSTREAM_TESTS=1`, fails) the importing test module when they cannot be had."""
    root = cache_dir()
    target = root / PACKAGE
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{PACKAGE}.lock", "w") as lock:  # pytest-xdist workers: one downloads, the others wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _fetch(target)
    except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError, StopIteration) as error:
        reason = f"transformers {VERSION}'s common tests could not be fetched from its sdist: {error}"
        if REQUIRED:
            pytest.fail(reason + " (FSGR_PMA_REQUIRE_UPSTREAM_TESTS=1)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _stand_ins(target)
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
