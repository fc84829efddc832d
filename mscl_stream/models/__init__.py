"""Models: R3D-18 backbone + FPN/SEPC neck, frame-wise flow network, and the MSCL module."""

from mscl_stream.models.flownet import FlowNet
from mscl_stream.models.neck import FPNSEPCNeck, SEPCBlock
from mscl_stream.models.r3d import R3DBackbone, to_torchvision

__all__ = ["FlowNet", "FPNSEPCNeck", "SEPCBlock", "R3DBackbone", "to_torchvision"]
