"""dlsn.utils.files: the one atomic writer, strict JSON and the inter-process lock."""

import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlsn.utils.files import (
    NonFiniteJSONError,
    atomic_write,
    atomic_write_text,
    current_umask,
    file_lock,
    strict_json_dumps,
    write_json_strict,
)

FILES_PY = Path(__file__).resolve().parents[1] / "dlsn" / "utils" / "files.py"


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_final_file_gets_the_mode_the_umask_allows(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    target = atomic_write_text(tmp_path / "results.json", "{}\n")
    assert mode_of(target) == 0o666 & ~mask  # mkstemp alone would leave 0600
    # Replacing an existing file gives the same mode.
    atomic_write(target, lambda f: f.write(b"[]\n"))
    assert mode_of(target) == 0o666 & ~mask and target.read_text() == "[]\n"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old complete file")

    def crash(handle):
        handle.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_missing_directory_is_created_and_text_mode_is_utf8(tmp_path):
    target = atomic_write_text(tmp_path / "a" / "b" / "note.txt", "PSNR 33.1 dB, SSIM 0.93 — Ω")
    assert target.read_bytes().decode("utf-8") == "PSNR 33.1 dB, SSIM 0.93 — Ω"
    with pytest.raises(ValueError, match="'w' or 'wb'"):
        atomic_write(tmp_path / "x", lambda f: None, mode="a")


def run_with_files_module(body: str, *args: str) -> subprocess.Popen:
    """Start a Python process that loads dlsn/utils/files.py by path (fast: no package imports) and runs ``body``."""
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('files_alone', {str(FILES_PY)!r})\n"
        "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n" + body
    )
    return subprocess.Popen([sys.executable, "-c", code, *args])


WRITER = """
path, label = sys.argv[1], sys.argv[2]
for i in range(60):
    files.atomic_write_text(path, f"{label}:{i}:" + label * 20000)
"""


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    """Two processes rewrite one file; every read sees one complete version (unique temporary names)."""
    target = tmp_path / "shared.txt"
    atomic_write_text(target, "start")
    writers = [run_with_files_module(WRITER, str(target), label) for label in "ab"]
    reads = 0
    while any(w.poll() is None for w in writers):
        text = target.read_text()
        if text != "start":
            label = text[0]
            assert text.split(":", 2)[2] == label * 20000, "partial file seen"
        reads += 1
    assert [w.returncode for w in writers] == [0, 0] and reads > 0
    assert target.read_text().split(":")[1] == "59"
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]  # no temporaries left behind


# ---------------------------------------------------------------- strict JSON


def test_strict_json_names_the_non_finite_key():
    results = {"Set5": {"psnr": math.inf, "ssim": 0.9}, "Set14": {"psnr": 30.0, "ssim": 0.8}}
    with pytest.raises(NonFiniteJSONError, match=r"'Set5\.psnr' is inf"):
        strict_json_dumps(results)
    with pytest.raises(NonFiniteJSONError, match=r"'runs\[1\]' is nan"):
        strict_json_dumps({"runs": [1.0, float("nan")]})


def test_strict_json_null_mode_and_numpy_scalars(caplog):
    text = strict_json_dumps({"a": {"psnr": -math.inf}, "b": np.float32(1.5), "n": np.int64(3), "ok": True},
                             non_finite="null")
    assert json.loads(text) == {"a": {"psnr": None}, "b": 1.5, "n": 3, "ok": True}
    assert "Infinity" not in text and "a.psnr" in caplog.text
    torch = pytest.importorskip("torch")
    assert json.loads(strict_json_dumps({"v": torch.tensor(2.5, dtype=torch.float64)})) == {"v": 2.5}
    with pytest.raises(NonFiniteJSONError, match="'v'"):
        strict_json_dumps({"v": torch.tensor(float("inf"))})


def test_write_json_strict_writes_nothing_on_error(tmp_path):
    target = tmp_path / "results.json"
    write_json_strict(target, {"Set5": {"psnr": 33.5}})
    with pytest.raises(NonFiniteJSONError):
        write_json_strict(target, {"Set5": {"psnr": math.inf}})
    assert json.loads(target.read_text()) == {"Set5": {"psnr": 33.5}}
    assert target.read_text().endswith("\n")


# ---------------------------------------------------------------- lock


HOLDER = """
from pathlib import Path
lock, marker = sys.argv[1], Path(sys.argv[2])
with files.file_lock(lock):
    marker.write_text("held")
    time.sleep(1.0)
    marker.write_text("done")  # last action before releasing the lock
"""


def test_file_lock_excludes_another_process(tmp_path):
    lock, marker = tmp_path / "x.lock", tmp_path / "marker"
    holder = run_with_files_module(HOLDER, str(lock), str(marker))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists()
        with file_lock(lock):
            # Reached only after the holder released the lock; without the lock this reads "held".
            assert marker.read_text() == "done"
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


# ---------------------------------------------------------------- imports


def test_files_module_imports_only_the_standard_library():
    """The module itself pulls in nothing heavy (loaded by path, without its package __init__)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('files_alone', {str(FILES_PY)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'hydra', 'omegaconf', 'lightning', 'rich', 'PIL') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_dlsn_utils_files_stays_light():
    """Importing dlsn.utils (and its file helpers) pulls in no Hydra, Lightning or Rich (issue 11 point 7)."""
    code = ("import sys, dlsn.utils, dlsn.utils.files\n"
            "print(sorted(m for m in ('hydra', 'omegaconf', 'lightning', 'rich') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
