"""Detector modules: ResNet/ResNeXt bodies from an arch, FPN, Faster R-CNN assembly."""

from jdsearch.models.detector import Detector, ResNetFPN, build_detector
from jdsearch.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["BasicBlock", "Bottleneck", "Detector", "ResNet", "ResNetFPN", "build_detector"]
