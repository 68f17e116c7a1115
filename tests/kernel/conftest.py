"""The guest's tests need vcan0 and i2c-stub: the host never collects them; the host-side tests
(test_kernel_guest.py, test_systemd_guest.py) read the results of one boot of the guest, which
runs them there, with the directory named explicitly (pytest collects an explicitly named path
whatever ``collect_ignore`` says)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel import harness, systemd_guest

collect_ignore = ["guest"]


@pytest.fixture(scope="session")
def guest_boot() -> Iterator[harness.GuestRun]:
    """The one boot of the qemu guest (systemd_guest.py): the guest tests, then the systemd
    checks. Set up, booted and waited for once, by whichever test asks first; the cache stays
    locked (``harness.exclusive``) until the session ends, so every test reads this boot's
    results. A failing set-up fails every test that asks."""
    with harness.exclusive():
        image = harness.set_up()
        harness.prepare_share()
        harness.warm_numba_cache()
        systemd_guest.write_share_files()
        yield systemd_guest.boot(image)
