"""Backend interfaces and the registry that finds them by name.

As python-can does with ``BACKENDS``, the config names a backend and the registry loads it on
demand; unlike python-can, every backend (ours included) is an entry point, so ``bms`` never
imports ``drivers`` and a third party adds a front-end by declaring an entry point in one of the
groups ``bms.frontends``, ``bms.contactors``, ``bms.publishers`` or ``bms.simulators``.
Each backend class carries a pydantic ``Options`` model that validates its config section.
"""

from __future__ import annotations

import abc
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel

from bms.types import ContactorFeedback, Measurement, PackStatus, RelayStates

if TYPE_CHECKING:
    from bms.config import BmsConfig


class FrontEndError(Exception):
    """A front-end that cannot be opened or read; inside the loop it becomes a fault."""


class InjectionError(ValueError):
    """A simulator fault injection that cannot be understood or does not fit the pack."""


class UnknownBackendError(LookupError):
    def __init__(self, group: str, name: str, known: list[str]):
        super().__init__(f"no backend {name!r} in {group}; known: {', '.join(known)}")
        self.known = known


def load(group: str, name: str) -> type:
    """Return the backend class registered as ``name`` in the entry-point ``group``."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        raise UnknownBackendError(group, name, sorted(found))
    return found[name].load()


class Backend(abc.ABC):
    """Common life cycle: built from the whole config, then ``close()`` exactly once."""

    Options: ClassVar[type[BaseModel]]

    @abc.abstractmethod
    def __init__(self, config: BmsConfig, options: BaseModel) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release the hardware; must be safe to call more than once."""


class FrontEnd(Backend):
    """Cell, temperature and pack measurements, and the cells' bleed resistors."""

    supports_balancing: ClassVar[bool] = False

    @abc.abstractmethod
    def read(self, t_s: float) -> Measurement:
        """Return the newest sample; never block longer than a small fraction of a cycle."""

    def balance(self, cells: np.ndarray) -> None:
        """Switch the bleed resistors of the cells in the mask (n_cells,) on, the rest off;
        sent every cycle, so a front-end that stops hearing it stops bleeding."""
        raise NotImplementedError(f"{type(self).__name__} cannot balance")


class ContactorDriver(Backend):
    """Drives the relays and reads their feedback. ``command`` doubles as the dead-man refresh:
    the driver (or the hardware behind it) opens everything when it stops being called."""

    @abc.abstractmethod
    def command(self, relays: RelayStates) -> None: ...

    @abc.abstractmethod
    def feedback(self, t_s: float) -> ContactorFeedback: ...


class Publisher(Backend):
    """Publishes each cycle's status (status frames, telemetry); must never block the loop."""

    @abc.abstractmethod
    def publish(self, status: PackStatus) -> None: ...


class Simulator(abc.ABC):
    """A simulated pack that runs beside the loop, attached to the same bus as the backends."""

    Options: ClassVar[type[BaseModel]]

    @abc.abstractmethod
    def __init__(self, config: BmsConfig, options: BaseModel, injections: list[str]) -> None: ...

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...
