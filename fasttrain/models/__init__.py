"""Encoders. ``build_encoder(name, **kwargs)`` maps an architecture name to a multi-exit ResNet."""
from fasttrain.models.multi_exit import (ARCHS, EXIT_KINDS, EXIT_POINTS, HEADS, STEMS, EncoderOutput,
                                         MultiExitResNet, build_subnetwork, exit_names)


def build_encoder(arch: str, **kwargs) -> MultiExitResNet:
    return MultiExitResNet(arch, **kwargs)


__all__ = ["ARCHS", "EXIT_KINDS", "EXIT_POINTS", "HEADS", "STEMS", "EncoderOutput", "MultiExitResNet", "build_encoder",
           "build_subnetwork", "exit_names"]
