"""Fine-grained methods as plug-ins of the engine (see ``_base`` for the interface).

Public API::

    create_method(name="plain", *, parts=None, **options), list_methods(), method_class(name)
    method_from_config(MethodConfig, parts=...), method_for_run(MethodConfig, export=config.json of file:)
    Method, StepOutput, StepContext, StepParts, register_method
    MethodModel  # what non-plain methods build around a timm backbone

Registered: ``plain``; second-order pooling ``bcnn``, ``cbp``, ``isqrt_cov`` (:mod:`.pooling`);
attention cropping ``wsdan``, ``cal`` (:mod:`.attention`); multi-granularity ``pmg`` (:mod:`.granularity`); ViT part selection ``transfg`` (:mod:`.transformer`); pairwise interaction ``api_net`` (:mod:`.pairwise`); part navigation ``nts_net`` (:mod:`.parts`); the plug-in module ``pim`` and ``herbs`` (:mod:`.plugin`); multi-level heads ``hierarchy``
(:mod:`.hierarchy`, switched on by ``--model.hierarchy true``).
"""
from fgclf.methods._base import (Method, StepContext, StepOutput, StepParts, create_method, list_methods,
                                 method_class, method_for_run, method_from_config, register_method)
from fgclf.methods._model import MethodModel
from fgclf.methods import plain as _plain  # noqa: F401  (registers)
from fgclf.methods import pooling as _pooling  # noqa: F401  (registers)
from fgclf.methods import attention as _attention  # noqa: F401  (registers)
from fgclf.methods import granularity as _granularity  # noqa: F401  (registers)
from fgclf.methods import transformer as _transformer  # noqa: F401  (registers)
from fgclf.methods import pairwise as _pairwise  # noqa: F401  (registers)
from fgclf.methods import parts as _parts  # noqa: F401  (registers)
from fgclf.methods import plugin as _plugin  # noqa: F401  (registers)
from fgclf.methods import hierarchy as _hierarchy  # noqa: F401  (registers)

__all__ = ["Method", "MethodModel", "StepContext", "StepOutput", "StepParts", "create_method", "list_methods",
           "method_class", "method_for_run", "method_from_config", "register_method"]
