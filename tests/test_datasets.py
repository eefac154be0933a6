"""Image reading, the decoded cache, record builders, training/eval datasets and the DIV2K downloader."""

import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlsn.data import ArrayCache, ImageReadError, degrade, read_image
from dlsn.data.datasets import ImageRecord, SREvalDataset, SRTrainDataset, benchmark_records, folder_records
from dlsn.data.div2k import ChecksumError, DownloadError, div2k_records, download_file, prepare_div2k, sha256_of
from dlsn.data.io import list_images
from tests.helpers.data import random_image, save_png, serve_folder

# ---------------------------------------------------------------- reading


def test_read_image_normalises_modes(tmp_path):
    rgb = random_image(9, 7)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(read_image(save_png(tmp_path / "rgb.png", rgb)), rgb)
    out = read_image(save_png(tmp_path / "gray.png", gray))
    assert out.shape == (9, 7, 3) and (out == gray[..., None]).all()
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 10, np.uint8)], axis=2)
    np.testing.assert_array_equal(read_image(save_png(tmp_path / "rgba.png", rgba)), rgb)
    # 16-bit grayscale: round(v * 255 / 65535).
    values = np.array([[0, 257, 65535, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[0, :, 0], [0, 1, 255, 4])
    # Palette images are expanded.
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (9, 7, 3)


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    buf = io.BytesIO()
    Image.fromarray(random_image(64, 64)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(tmp_path / "truncated.png")
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_list_images_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_images(tmp_path)


# ---------------------------------------------------------------- cache


def test_cache_builds_once_and_memory_maps(tmp_path):
    src = save_png(tmp_path / "a.png", random_image(8, 8))
    cache = ArrayCache(tmp_path / "cache")
    calls = []
    producer = lambda: calls.append(1) or read_image(src)
    first = cache.get(src, "hr", producer)
    second = cache.get(src, "hr", producer)
    assert len(calls) == 1
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, read_image(src))
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npy"]  # no temp files left


def test_cache_rebuilds_when_source_changes(tmp_path):
    src = save_png(tmp_path / "a.png", random_image(8, 8, seed=1))
    cache = ArrayCache(tmp_path / "cache")
    old_entry = cache.entry_path(src, "hr")
    cache.get(src, "hr", lambda: read_image(src))
    new_pixels = random_image(8, 8, seed=2)
    save_png(src, new_pixels)
    os.utime(src, ns=(1, 1))  # make the change visible even on coarse-mtime filesystems
    assert cache.entry_path(src, "hr") != old_entry
    np.testing.assert_array_equal(cache.get(src, "hr", lambda: read_image(src)), new_pixels)
    assert not old_entry.exists()  # the stale entry was replaced
    # Same stem in another folder does not collide.
    other = save_png(tmp_path / "b" / "a.png", random_image(8, 8, seed=3))
    assert cache.entry_path(other, "hr") != cache.entry_path(src, "hr")


def save_bmp(path, array):
    """Uncompressed BMP: the file size depends on the image size only, not on the pixels."""
    Image.fromarray(array).save(path, format="BMP")
    return path


@pytest.mark.parametrize("how", ["in_place", "renamed_into_place"])
def test_cache_is_not_fooled_by_a_replacement_with_equal_size_and_mtime(tmp_path, how):
    src = save_bmp(tmp_path / "a.bmp", random_image(40, 40, seed=1))
    before = os.stat(src)
    cache = ArrayCache(tmp_path / "cache")
    np.testing.assert_array_equal(cache.get(src, "hr", lambda: read_image(src)), random_image(40, 40, seed=1))
    new_pixels = random_image(40, 40, seed=2)
    if how == "in_place":  # same inode, new content
        save_bmp(src, new_pixels)
    else:  # e.g. rsync/cp to a temporary name and mv: a new inode
        os.replace(save_bmp(tmp_path / "new.bmp", new_pixels), src)
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))  # cp -p / rsync -t / tar restore times
    after = os.stat(src)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    np.testing.assert_array_equal(cache.get(src, "hr", lambda: read_image(src)), new_pixels)
    memory_cache = ArrayCache(None)
    np.testing.assert_array_equal(memory_cache.get(src, "hr", lambda: read_image(src)), new_pixels)


def test_cache_fingerprint_hashes_both_ends_of_the_file(tmp_path):
    from dlsn.data.cache import FINGERPRINT_BYTES, source_fingerprint

    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 * FINGERPRINT_BYTES, dtype=np.uint8).tobytes())
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(data))
    digest = source_fingerprint(path)[-1]
    for position, changes in ((0, True), (len(data) - 1, True), (len(data) // 2, False)):
        changed = bytearray(data)
        changed[position] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert (source_fingerprint(path)[-1] != digest) is changes, position
    with pytest.raises(FileNotFoundError, match="missing.png"):
        source_fingerprint(tmp_path / "missing.png")


def test_cache_files_get_the_umask_mode(tmp_path):
    src = save_png(tmp_path / "a.png", random_image(8, 8))
    from dlsn.data.io import write_png

    png = tmp_path / "out.png"
    previous = os.umask(0o002)
    try:
        entry = ArrayCache(tmp_path / "cache").handle(src, "hr", lambda: read_image(src)).path
        write_png(png, random_image(8, 8))
    finally:
        os.umask(previous)
    assert os.stat(entry).st_mode & 0o777 == 0o664  # group-readable/writable on shared storage
    assert os.stat(png).st_mode & 0o777 == 0o664
    np.testing.assert_array_equal(read_image(png), random_image(8, 8))


def test_cached_handles_pickle_as_paths(tmp_path):
    import pickle

    src = save_png(tmp_path / "a.png", random_image(300, 300))
    handle = ArrayCache(tmp_path / "cache").handle(src, "hr", lambda: read_image(src))
    handle.get()
    assert len(pickle.dumps(handle)) < 1000
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(handle)).get(), read_image(src))


# ---------------------------------------------------------------- records


def test_benchmark_records_pair_lr_files(tmp_path):
    for name in ("img_001", "img_002"):
        save_png(tmp_path / "SetA" / "HR" / f"{name}.png", random_image(8, 8))
    save_png(tmp_path / "SetA" / "LR_bicubic" / "X2" / "img_001x2.png", random_image(4, 4))
    save_png(tmp_path / "SetA" / "LR_bicubic" / "X2" / "img_002.png", random_image(4, 4))
    records = benchmark_records(tmp_path, "SetA", 2)
    assert [r.lr_path.name for r in records] == ["img_001x2.png", "img_002.png"]
    assert all(r.lr_path is None for r in benchmark_records(tmp_path, "SetA", 3))  # no X3 folder: on the fly
    (tmp_path / "SetA" / "LR_bicubic" / "X2" / "img_002.png").unlink()
    with pytest.raises(FileNotFoundError, match="img_002"):
        benchmark_records(tmp_path, "SetA", 2)
    assert [r.name for r in benchmark_records(tmp_path, "SetA", 2, on_error="skip")] == ["img_001"]
    with pytest.raises(FileNotFoundError, match="SetB"):
        benchmark_records(tmp_path, "SetB", 2)


def test_same_stem_in_one_set_gets_distinct_names(tmp_path):
    from dlsn.data.io import sr_file_name, strip_sr_suffix, unique_image_names

    a_png = save_png(tmp_path / "a.png", random_image(16, 16, seed=1))
    a_jpg = tmp_path / "a.jpg"
    Image.fromarray(random_image(16, 16, seed=2)).save(a_jpg, quality=95)
    save_png(tmp_path / "b.png", random_image(16, 16, seed=3))
    records = folder_records(tmp_path, 2)
    assert [(r.name, r.hr_path.name) for r in records] == [("a_jpg", "a.jpg"), ("a_png", "a.png"), ("b", "b.png")]
    dataset = SREvalDataset(records, 2, "BI", "S")
    names = [dataset[i]["name"] for i in range(len(dataset))]
    # The saved SR images (<name>_x<scale>_SR.png) of the two files no longer overwrite each other ...
    assert len({sr_file_name(n, 2) for n in names}) == 3
    # ... and map back to their record names.
    assert [strip_sr_suffix(Path(sr_file_name(n, 2)).stem, 2) for n in names] == names
    # A name that would still collide is numbered.
    assert unique_image_names(["x/a.png", "x/a.jpg", "x/a_png.bmp"]) == ["a_png", "a_jpg", "a_png_2"]
    assert unique_image_names([a_png]) == ["a"]


def test_lr_file_with_wrong_size_is_an_error(tmp_path):
    hr = save_png(tmp_path / "HR" / "x.png", random_image(16, 16))
    lr = save_png(tmp_path / "LR_bicubic" / "X2" / "xx2.png", random_image(7, 8))
    with pytest.raises(ValueError, match="xx2.png"):
        SREvalDataset([ImageRecord("x", hr, lr)], 2, "BI")


# ---------------------------------------------------------------- training dataset


def find_window(big: np.ndarray, small: np.ndarray):
    """(top, left) of the unique occurrence of ``small`` in ``big``."""
    h, w = small.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(big, (h, w), axis=(0, 1))  # H', W', C, h, w
    match = np.all(windows == small.transpose(2, 0, 1)[None, None], axis=(2, 3, 4))
    hits = np.argwhere(match)
    assert len(hits) == 1, f"{len(hits)} matches"
    return tuple(hits[0])


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return (t * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("degradation", ["BI", "BD"])
def test_train_patches_are_aligned_with_lr_of_the_full_image(tmp_path, degradation):
    hr = random_image(60, 72, seed=5)
    path = save_png(tmp_path / "img.png", hr)
    ds = SRTrainDataset([ImageRecord("img", path)], 3, degradation, patch_size=6, length=8,
                        cache=ArrayCache(tmp_path / "c"), augment=False)
    full_lr = degrade(hr, 3, degradation)  # degradation of the *whole* image: exact at patch borders
    torch.manual_seed(0)
    for i in range(4):
        item = ds[i]
        lr, hr_patch = to_hwc(item["lr"]), to_hwc(item["hr"])
        assert lr.shape == (6, 6, 3) and hr_patch.shape == (18, 18, 3)
        top, left = find_window(full_lr, lr)
        np.testing.assert_array_equal(hr_patch, hr[top * 3 : top * 3 + 18, left * 3 : left * 3 + 18])


def test_augmentation_applies_the_same_transform_to_lr_and_hr(tmp_path):
    hr = random_image(40, 40, seed=6)
    path = save_png(tmp_path / "img.png", hr)
    ds = SRTrainDataset([ImageRecord("img", path)], 2, "BI", patch_size=5, length=64, augment=True)
    full_lr = degrade(hr, 2, "BI")
    transforms = [lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a.transpose(1, 0, 2)]
    seen = set()
    torch.manual_seed(1)
    for i in range(24):
        item = ds[i]
        lr, hr_patch = to_hwc(item["lr"]), to_hwc(item["hr"])
        found = False
        for code in range(8):  # undo transpose, vflip, hflip (in reverse order of application)
            un_lr, un_hr = lr, hr_patch
            if code & 4:
                un_lr, un_hr = transforms[3](un_lr), transforms[3](un_hr)
            if code & 2:
                un_lr, un_hr = transforms[2](un_lr), transforms[2](un_hr)
            if code & 1:
                un_lr, un_hr = transforms[1](un_lr), transforms[1](un_hr)
            windows = np.lib.stride_tricks.sliding_window_view(full_lr, (5, 5), axis=(0, 1))
            hits = np.argwhere(np.all(windows == np.ascontiguousarray(un_lr).transpose(2, 0, 1)[None, None], axis=(2, 3, 4)))
            if len(hits) == 1:
                top, left = hits[0]
                np.testing.assert_array_equal(un_hr, hr[top * 2 : top * 2 + 10, left * 2 : left * 2 + 10])
                seen.add(code)
                found = True
                break
        assert found
    assert len(seen) >= 4  # several different flips/transpositions were drawn


def test_train_length_and_reproducibility(tmp_path):
    path = save_png(tmp_path / "img.png", random_image(64, 64))
    ds = SRTrainDataset([ImageRecord("img", path)], 2, "BI", patch_size=8, length=1000 * 16)
    assert len(ds) == 16000

    def draw(seed):
        torch.manual_seed(seed)
        ds._rng = None
        return torch.stack([ds[i]["lr"] for i in range(5)])

    torch.testing.assert_close(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_dn_training_adds_fresh_noise_on_the_bi_patch(tmp_path):
    hr = np.full((64, 64, 3), 120, np.uint8)
    path = save_png(tmp_path / "flat.png", hr)
    ds = SRTrainDataset([ImageRecord("flat", path)], 2, "DN", patch_size=16, length=10, augment=False)
    torch.manual_seed(0)
    a, b = to_hwc(ds[0]["lr"]).astype(float), to_hwc(ds[1]["lr"]).astype(float)
    assert abs((a - 120).std() - 30) < 3 and abs((b - 120).std() - 30) < 3
    assert not np.array_equal(a, b)


def test_too_small_image_raises_or_is_skipped(tmp_path, caplog):
    big = save_png(tmp_path / "big.png", random_image(64, 64))
    small = save_png(tmp_path / "small.png", random_image(20, 64))
    records = [ImageRecord("big", big), ImageRecord("small", small)]
    with pytest.raises(ValueError, match="small.png"):
        SRTrainDataset(records, 2, "BI", patch_size=16, length=4)
    with caplog.at_level(logging.WARNING):
        ds = SRTrainDataset(records, 2, "BI", patch_size=16, length=4, on_error="skip")
    assert ds.names == ["big"] and "small.png" in caplog.text


def test_corrupt_file_in_dataset_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="bad.png"):
        SRTrainDataset(folder_records(tmp_path, 2), 2, "BI", patch_size=4, length=4)


# ---------------------------------------------------------------- evaluation dataset


def test_eval_dataset_full_images_and_deterministic_dn(tmp_path):
    hr = random_image(50, 45, seed=7)
    save_png(tmp_path / "img.png", hr)
    save_png(tmp_path / "gray.png", hr[..., 0])
    records = folder_records(tmp_path, 4)
    first = SREvalDataset(records, 4, "DN", "S", cache=ArrayCache(tmp_path / "c1"), seed=0)
    again = SREvalDataset(records, 4, "DN", "S", cache=None, seed=0)
    other_seed = SREvalDataset(records, 4, "DN", "S", cache=None, seed=1)
    item = first[1]
    assert item["name"] == "img" and item["hr"].shape == (3, 48, 44) and item["lr"].shape == (3, 12, 11)
    assert first[0]["gray"] and not item["gray"]
    torch.testing.assert_close(again[1]["lr"], item["lr"])
    assert not torch.equal(other_seed[1]["lr"], item["lr"])
    np.testing.assert_array_equal(to_hwc(SREvalDataset(records, 4, "BI")[1]["lr"]), degrade(hr, 4, "BI"))
    noise = to_hwc(item["lr"]).astype(float) - degrade(hr, 4, "BI")
    assert 20 < noise.std() < 40  # sigma 30, clipped at the extremes of a random image


# ---------------------------------------------------------------- DIV2K downloader


def make_div2k_zip(folder, name, members):
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, array in members.items():
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format="PNG")
            zf.writestr(member, buf.getvalue())
    return path


@pytest.fixture
def div2k_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    hr = {f"DIV2K_valid_HR/{i:04d}.png": random_image(16, 16, seed=i) for i in (801, 802)}
    lr = {f"DIV2K_valid_LR_bicubic/X2/{i:04d}x2.png": degrade(a, 2, "BI") for i, a in zip((801, 802), hr.values())}
    make_div2k_zip(served, "DIV2K_valid_HR.zip", hr)
    make_div2k_zip(served, "DIV2K_valid_LR_bicubic_X2.zip", lr)
    url, handler, server = serve_folder(served)
    yield served, url, handler
    server.shutdown()
    server.server_close()


def test_prepare_div2k_downloads_records_checksums_and_extracts(tmp_path, div2k_server):
    served, url, _ = div2k_server
    root = tmp_path / "DIV2K"
    prepare_div2k(root, splits=["valid"], scales=[2], base_url=url)
    import json

    sums = json.loads((root / "checksums.json").read_text())
    assert sums["DIV2K_valid_HR.zip"] == sha256_of(served / "DIV2K_valid_HR.zip")
    records = div2k_records(root, "valid", 2, ids=(801, 900))
    assert [r.name for r in records] == ["0801", "0802"]
    assert records[0].lr_path.name == "0801x2.png"
    assert not (root / "DIV2K_valid_HR.zip").exists()  # archives removed after extraction
    prepare_div2k(root, splits=["valid"], scales=[2], base_url="http://127.0.0.1:9/")  # present: no network


def test_two_processes_preparing_div2k_at_once_take_turns(tmp_path, div2k_server):
    """Per-archive locks: the second preparer waits, then finds the folder extracted (no shared .part)."""
    import json
    import threading

    served, url, handler = div2k_server
    root = tmp_path / "DIV2K"
    errors = []

    def prepare():
        try:
            prepare_div2k(root, splits=["valid"], scales=[2], base_url=url)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert [r.name for r in div2k_records(root, "valid", 2)] == ["0801", "0802"]
    assert sorted(path for path, _ in handler.requests_seen) == ["/DIV2K_valid_HR.zip", "/DIV2K_valid_LR_bicubic_X2.zip"]
    assert set(json.loads((root / "checksums.json").read_text())) == {"DIV2K_valid_HR.zip", "DIV2K_valid_LR_bicubic_X2.zip"}


def test_download_resumes_with_range(tmp_path, div2k_server):
    served, url, handler = div2k_server
    data = (served / "DIV2K_valid_HR.zip").read_bytes()
    dest = tmp_path / "out.zip"
    (tmp_path / "out.zip.part").write_bytes(data[:100])
    download_file(url + "DIV2K_valid_HR.zip", dest, sha256=sha256_of(served / "DIV2K_valid_HR.zip"))
    assert dest.read_bytes() == data
    assert handler.requests_seen[-1][1] == "bytes=100-"


def test_download_restarts_when_server_ignores_range(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "f.bin").write_bytes(bytes(range(256)) * 10)
    url, handler, server = serve_folder(served, ignore_range=True)
    try:
        (tmp_path / "f.bin.part").write_bytes(b"\x00" * 50)
        download_file(url + "f.bin", tmp_path / "f.bin")
        assert (tmp_path / "f.bin").read_bytes() == (served / "f.bin").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_checksum_mismatch_deletes_and_raises(tmp_path, div2k_server):
    _, url, _ = div2k_server
    dest = tmp_path / "x.zip"
    with pytest.raises(ChecksumError, match="expected sha256 0{64}"):
        download_file(url + "DIV2K_valid_HR.zip", dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "x.zip.part").exists()


def test_prepare_div2k_script_reports_no_partial_data_when_there_is_none(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_div2k.py"
    spec = importlib.util.spec_from_file_location("prepare_div2k_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--root", str(tmp_path / "D"), "--splits", "valid", "--scales", "2", "--no-lr",
            "--base-url", "http://127.0.0.1:9/", "--timeout", "2"]
    assert module.main(args) == 1
    err = capsys.readouterr().err
    assert "cannot download" in err and "DIV2K_valid_HR.zip" in err and "Partial" not in err


def test_offline_download_gives_a_clear_message(tmp_path):
    with pytest.raises(DownloadError, match="offline") as no_part:
        download_file("http://127.0.0.1:9/DIV2K_valid_HR.zip", tmp_path / "a.zip", timeout=2)
    # No partial file exists, so the message must not claim one is kept (issue 12 point 7).
    assert "Partial" not in str(no_part.value) and not (tmp_path / "a.zip.part").exists()
    (tmp_path / "b.zip.part").write_bytes(b"x" * 100)
    with pytest.raises(DownloadError, match=r"Partial data \(100 bytes\) kept in .*b\.zip\.part"):
        download_file("http://127.0.0.1:9/DIV2K_valid_HR.zip", tmp_path / "b.zip", timeout=2)
    with pytest.raises(FileNotFoundError, match="prepare_div2k"):
        div2k_records(tmp_path, "train", 2)
