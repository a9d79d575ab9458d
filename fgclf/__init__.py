"""fgclf: fine-grained image classification on timm + accelerate.

Public factories live in the sub-packages: ``fgclf.data.create_dataset``,
``fgclf.models.create_model``, ``fgclf.losses.create_loss``, ``fgclf.optim.create_optimizer`` /
``create_scheduler`` and ``fgclf.metrics.create_metrics``. Imports are lazy so that
``import fgclf`` stays cheap.
"""
__version__ = "0.1.0"
