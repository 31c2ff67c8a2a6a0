"""Shared set-up for the engine's stage tests: one BLAS thread (small matrices, a shared machine)."""

from collections.abc import Iterator

import pytest

from reference import single_threaded


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Iterator[None]:
    with single_threaded():
        yield
