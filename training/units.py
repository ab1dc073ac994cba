"""Masks that keep whole units: a channel group read by a grouped conv keeps whole conv groups.

The trace (`training.graph`) records per channel group the run of channels that must stay or go together
(`ChannelGroup.unit`: the channels per group of a grouped conv on it). `whole_units` moves a mask's kept
channels onto whole aligned units, keeping as many channels as it can (the count changes only when it is not
a multiple of the unit): the units holding most kept channels stay.
"""
from __future__ import annotations

from .graph import NetworkGraph
from .mask import Mask


def whole_units(graph: NetworkGraph, mask: Mask) -> Mask:
    kept_channels = dict(mask.kept_channels)
    for name, kept in mask.kept_channels.items():
        unit = graph.groups[name].unit
        if unit == 1:
            continue
        count = {u: 0 for u in range(graph.groups[name].width // unit)}
        for channel in kept:
            count[channel // unit] += 1
        keep = max(1, round(len(kept) / unit))
        chosen = sorted(sorted(count, key=lambda u: (-count[u], u))[:keep])
        kept_channels[name] = [u * unit + i for u in chosen for i in range(unit)]
    return Mask(kept_channels, list(mask.closed_blocks))
