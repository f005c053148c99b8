"""The adversarial suite: the real handlers, over sockets, against a world that misbehaves (see ``tests.world``)."""

from tests.world import world

__all__ = ["world"]
