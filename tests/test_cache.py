import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from maskcls.data import cache
from maskcls.data.layout import scan
from maskcls.errors import DataError

# A worker that records in `log` each time it really decodes, then builds (or reuses) the cache.
WORKER = textwrap.dedent("""
    import sys, time
    from maskcls.data import cache
    from maskcls.data.layout import scan
    root, cache_dir, log = sys.argv[1:]
    original = cache._write
    def counted(*args, **kwargs):
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to arrive and wait
        original(*args, **kwargs)
    cache._write = counted
    images = cache.build(list(scan(root)["path"]), (32, 24), cache_dir, progress=False)
    print(images.shape, int(images.sum()))
""")


@pytest.mark.slow
def test_two_concurrent_processes_build_the_cache_once(small_root, tmp_path):
    log = tmp_path / "log"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [sys.executable, str(script), str(small_root), str(tmp_path / "cache"), str(log)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().count("built") == 1
    assert outputs[0] == outputs[1] and "(168, 32, 24, 3)" in outputs[0]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_a_changed_file_makes_a_new_cache(small_root, tmp_path):
    paths = list(scan(small_root)["path"])[:10]
    first = cache.build(paths, (32, 24), tmp_path, progress=False)
    again = cache.build(paths, (32, 24), tmp_path, progress=False)
    assert first.filename == again.filename
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(Path(paths[0]).read_bytes())
    changed = [str(copy)] + paths[1:]
    before = cache.build(changed, (32, 24), tmp_path, progress=False)
    time.sleep(0.01)
    from PIL import Image

    Image.new("RGB", (48, 64), (255, 0, 0)).save(copy)  # same name, new content
    os.utime(copy, ns=(time.time_ns(), time.time_ns()))
    after = cache.build(changed, (32, 24), tmp_path, progress=False)
    assert before.filename != after.filename
    assert np.asarray(after[0]).mean(axis=(0, 1)).argmax() == 0  # the red image
    assert cache.build(paths, (16, 12), tmp_path, progress=False).shape == (10, 16, 12, 3)


def test_an_undecodable_image_is_a_data_error_and_leaves_no_file(small_root, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DataError, match="not a decodable image"):
        cache.build([str(bad)], (32, 24), tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*"))
