"""saq: sharpness-aware quantization-aware training (SAQ) for PyTorch.

>>> import saq
>>> model = saq.models.get_model("preact_resnet20", num_classes=100)
>>> saq.quantize_model(model, weight_bits=4, act_bits=4, quantizer="liq")
>>> opt = saq.SAQ(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True), rho=0.4)
"""
from . import nn
from .convert import quantize_model, quantized_layers
from .optim import SAQ

__version__ = "0.1.0"


def __getattr__(name):
    # models and data import lazily: `import saq` stays cheap and never needs scikit-learn.
    if name in ("models", "data"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'saq' has no attribute {name!r}")


__all__ = ["nn", "quantize_model", "quantized_layers", "SAQ", "models", "data", "__version__"]
