"""The paper's models (LeNet-5, Conv4, half-width ResNet-18, ViT, MLP): defined in
``spafl_kernels.models``, which the layer and model benchmarks use too."""

from spafl_kernels.models import MODELS, build_model

__all__ = ["MODELS", "build_model"]
