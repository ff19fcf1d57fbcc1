"""The embedded default: a world of facts whose truth is known, and a small model pretrained on it."""

from knowcat.world.build import PRESETS, WorldConfig, build_world, read_exposures  # noqa: F401
