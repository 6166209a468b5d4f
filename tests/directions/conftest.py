"""Fixtures shared by the tests of ``directions``."""

from __future__ import annotations

import pytest

from directions import kernels


@pytest.fixture(scope="module")
def built():
    """frankly's int8 kernel, built (or found in the cache) for this machine: the CI machine has g++ and AVX2."""
    kernels.reset_for_tests()
    k = kernels.choose("frankly", quiet=True)
    assert k.name == "frankly"
    yield k
    kernels.reset_for_tests()
