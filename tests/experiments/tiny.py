"""A tiny CapsNet for the experiment tests."""
import capstriton as ct


def tiny_capsnet(image_size=28, **kw):
    return ct.CapsNet(image_size=image_size, conv_channels=4, primary_caps=2, iterations=2, backend="torch", **kw)
