import platform

import pytest

from minidisel.allocator import MMAP_THRESHOLD_MAX, keep_freed_memory


def test_keep_freed_memory_applies_on_glibc():
    applied = keep_freed_memory()
    assert isinstance(applied, bool)
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize(
    "arguments, words",
    [
        ({"mmap_threshold": MMAP_THRESHOLD_MAX + 1}, "mmap_threshold must be in"),
        ({"mmap_threshold": 0}, "mmap_threshold must be in"),
        ({"trim_threshold": 2**31}, "trim_threshold must be in"),
    ],
)
def test_keep_freed_memory_rejects_bad_thresholds(arguments, words):
    with pytest.raises(ValueError, match=words):
        keep_freed_memory(**arguments)
