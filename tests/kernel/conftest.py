"""The guest's tests need vcan0 and i2c-stub: the host never collects them; the host-side test
(test_kernel_guest.py) boots the guest and runs them there, with the directory named
explicitly (pytest collects an explicitly named path whatever ``collect_ignore`` says)."""

collect_ignore = ["guest"]
