"""The hardware-in-the-loop rig: instrument drivers, the rig's config and wiring, a virtual rig
for CI, and the ordered rig tests (``pytest hil --rig=virtual|bench``; see hil/README.md)."""
