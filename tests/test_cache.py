import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from alnet.cli import app
from alnet.data.cache import PrepareError, prepare
from alnet.data.cnmc import scan
from alnet.data.transforms import Preprocessing, load_image


def _first_training_image(root: Path) -> Path:
    return sorted((root / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all").iterdir())[0]


def test_cache_holds_every_cnmc_mini_image_as_224_uint8(mini_root, tmp_path):
    cells = scan(mini_root).cells
    prepared = prepare(cells, tmp_path, workers=2)
    assert prepared.images.shape == (52, 224, 224, 3) and prepared.images.dtype == np.uint8
    assert [c.path for c in prepared.cells] == [c.path for c in cells]
    # Row i is image i: compare one row with a direct decode.
    np.testing.assert_array_equal(prepared.images[7], load_image(cells[7].path, Preprocessing())[0])
    assert not str(prepared.path).startswith(str(mini_root))


def test_second_prepare_reuses_the_cache_and_a_touched_file_rebuilds_it(synthetic_copy, tmp_path):
    first = prepare(scan(synthetic_copy).cells, tmp_path)
    again = prepare(scan(synthetic_copy).cells, tmp_path)
    assert not first.reused and again.reused and again.path == first.path
    image = _first_training_image(synthetic_copy)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = prepare(scan(synthetic_copy).cells, tmp_path)
    assert not rebuilt.reused and rebuilt.path != first.path
    assert (first.path / "index.json").is_file(), "the older cache is kept"


def test_changed_parameters_give_a_different_cache(synthetic_root, tmp_path):
    cells = scan(synthetic_root).cells
    small = prepare(cells, tmp_path, Preprocessing(size=160))
    assert small.images.shape[1:] == (160, 160, 3)
    assert small.path != prepare(cells, tmp_path).path


def test_grayscale_rgba_and_odd_sized_images_are_converted_and_noted(synthetic_copy, tmp_path):
    folder = _first_training_image(synthetic_copy).parent
    source = Image.open(_first_training_image(synthetic_copy))
    source.convert("L").save(folder / "UID_1_9_1_all.bmp")
    rgba = source.convert("RGBA")
    rgba.putalpha(Image.new("L", source.size, 255))
    rgba.save(folder / "UID_1_9_2_all.png")
    source.resize((600, 500)).save(folder / "UID_1_9_3_all.bmp")
    prepared = prepare(scan(synthetic_copy).cells, tmp_path)
    assert prepared.skipped == []
    assert prepared.notes["converted from L to RGB"] == 1
    assert prepared.notes["converted from RGBA to RGB"] == 1
    assert prepared.notes["resized from 600x500"] == 1
    gray_row = [c.path.name for c in prepared.cells].index("UID_1_9_1_all.bmp")
    gray = prepared.images[gray_row]
    assert gray.shape == (224, 224, 3) and (gray[..., 0] == gray[..., 1]).all()


def test_transparent_pixels_become_black_background(tmp_path):
    image = Image.new("RGBA", (450, 450), (200, 100, 50, 0))
    image.paste((200, 100, 50, 255), (150, 150, 300, 300))
    image.save(tmp_path / "cell.png")
    pixels, _ = load_image(tmp_path / "cell.png", Preprocessing())
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[112, 112].tolist() == [200, 100, 50]


def _damage(root: Path) -> tuple[Path, Path]:
    folder = _first_training_image(root).parent
    truncated = folder / "UID_1_9_4_all.bmp"
    truncated.write_bytes(_first_training_image(root).read_bytes()[:5000])
    garbage = folder / "UID_1_9_5_all.bmp"
    garbage.write_bytes(b"this is not a bitmap at all" * 10)
    return truncated, garbage


def test_truncated_and_non_image_files_are_skipped_and_listed(synthetic_copy, tmp_path):
    truncated, garbage = _damage(synthetic_copy)
    cells = scan(synthetic_copy).cells
    prepared = prepare(cells, tmp_path, workers=2)
    assert {p.path for p in prepared.skipped} == {truncated, garbage}
    assert len(prepared.cells) == len(cells) - 2 == prepared.images.shape[0]
    assert all("replace or remove" in p.message for p in prepared.skipped)


def test_strict_stops_at_an_unreadable_image_and_keeps_the_existing_cache(synthetic_copy, tmp_path):
    cache = tmp_path / "cache"
    good = prepare(scan(synthetic_copy).cells, cache)
    truncated, garbage = _damage(synthetic_copy)
    with pytest.raises(PrepareError, match="cannot decode") as err:
        prepare(scan(synthetic_copy).cells, cache, strict=True)
    assert str(truncated) in str(err.value) or str(garbage) in str(err.value)
    assert (good.path / "index.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [good.path.name], "no half-built cache is left"


def test_an_interrupted_prepare_leaves_nothing_that_loads_as_valid(synthetic_copy, tmp_path):
    def interrupt(done, total):
        raise KeyboardInterrupt

    cells, cache = scan(synthetic_copy).cells, tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare(cells, cache, progress=interrupt)
    assert list(cache.iterdir()) == []
    assert not prepare(cells, cache).reused


def test_an_unwritable_cache_directory_is_a_one_line_error(synthetic_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PrepareError, match="pass --cache DIR or set ALNET_CACHE"):
        prepare(scan(synthetic_root).cells, blocker / "cache")


def test_prepare_command_lists_skipped_images_and_strict_fails(synthetic_copy, tmp_path):
    truncated, _ = _damage(synthetic_copy)
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", str(synthetic_copy), "--cache", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2 image(s) skipped" in result.output and truncated.name in result.output
    strict = runner.invoke(app, ["prepare", str(synthetic_copy), "--cache", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and "cannot decode" in strict.output


def test_a_full_disk_is_one_clear_message_and_leaves_no_temporary_folder(synthetic_root, tmp_path, monkeypatch):
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    cache = tmp_path / "cache"
    with pytest.raises(PrepareError, match="the disk is full.*--cache DIR"):
        prepare(scan(synthetic_root).cells, cache)
    assert list(cache.iterdir()) == []


def test_too_little_free_space_is_refused_before_anything_is_written(synthetic_root, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    cache = tmp_path / "cache"
    with pytest.raises(PrepareError, match=r"not enough free space for the cache \(needs \d+ MiB, 0 MiB free\)"):
        prepare(scan(synthetic_root).cells, cache)
    assert list(cache.iterdir()) == []


def test_a_build_left_by_a_killed_run_is_removed_and_nothing_else(synthetic_root, tmp_path):
    import socket

    cache = tmp_path / "cache"
    stale = cache / f".{'0123abcd' * 3}.tmp-{socket.gethostname()}-999999999"  # this host, no such process
    other_host = cache / f".{'0123abcd' * 3}.tmp-another-machine-999999999"  # may still be running there
    users = cache / ".photos.tmp-4242"  # looks alike, is not ours
    for folder in (stale, other_host, users):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"\0" * 1000)
    prepare(scan(synthetic_root).cells, cache)
    assert not stale.exists() and other_host.exists() and users.exists()


def _die_after_the_first_chunk(job):
    """A decoding worker that dies abruptly (as from SIGBUS) on every chunk but the first."""
    from alnet.data import cache as cache_module

    if job[1][0][0] > 0:
        os._exit(1)
    return cache_module.__dict__["_real_decode_chunk"](job)


def test_a_decoding_process_that_dies_stops_the_build_with_a_message(synthetic_copy, tmp_path, monkeypatch):
    """A worker killed (e.g. SIGBUS from a memory map on a full disk) ends the build, never hangs it."""
    from alnet.data import cache as cache_module

    monkeypatch.setitem(cache_module.__dict__, "_real_decode_chunk", cache_module._decode_chunk)
    for i in range(60):  # enough images for the multi-process path
        source = _first_training_image(synthetic_copy)
        (source.parent / f"UID_1_8_{i}_all.bmp").write_bytes(source.read_bytes())
    monkeypatch.setattr(cache_module, "_decode_chunk", _die_after_the_first_chunk)
    cache = tmp_path / "cache"
    with pytest.raises(PrepareError, match="a decoding process died"):
        prepare(scan(synthetic_copy).cells, cache, workers=2)
    assert list(cache.iterdir()) == []


def test_a_damaged_cache_is_built_again_not_trusted(synthetic_root, tmp_path):
    cells = scan(synthetic_root).cells
    first = prepare(cells, tmp_path)
    expected, array = np.array(first.images), first.path / "images.npy"
    del first  # its memory map would see the file cut short
    array.write_bytes(array.read_bytes()[:1000])  # cut short (a full disk, an interrupted copy)
    again = prepare(cells, tmp_path)
    assert not again.reused
    np.testing.assert_array_equal(again.images, expected)


def test_prepare_refuses_sizes_and_crops_that_make_no_image(synthetic_root, tmp_path):
    runner = CliRunner()
    for option in (["--size", "0"], ["--crop", "2"], ["--crop", "0"]):
        result = runner.invoke(app, ["prepare", str(synthetic_root), "--cache", str(tmp_path), *option])
        assert result.exit_code == 2 and option[0] in result.output
    assert list(tmp_path.iterdir()) == []
