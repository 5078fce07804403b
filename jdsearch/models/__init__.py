"""Detector modules: ResNet/ResNeXt bodies from an arch, FPN, the recording RoI heads and the
torchvision Faster R-CNN assembly (``build_detector``).

Imports the spec layer and torchvision; never data loading, checkpoints, training or the search.
"""

from jdsearch.models.detector import Detector, ResNetFPN, build_detector
from jdsearch.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["BasicBlock", "Bottleneck", "Detector", "ResNet", "ResNetFPN", "build_detector"]
