"""Model factory, offline weights, exports and PEFT for fgclf (timm underneath).

Public API::

    create_model(name, *, num_classes, pretrained=False, weights=None, ...)  # name grammar: _factory
    list_models(filter="", pretrained=False)
    resolve_data_config(model), count_parameters(model), unwrap_model(model)
    save_pretrained(model, dir, *, model_name, num_classes, class_names, model_kwargs=None)
    read_checkpoint_config(dir)
    apply_peft(model, *, method="lora", r=8, alpha=16, dropout=0.0, target_modules=None)
    default_target_modules(model), list_peft_methods()
    convert_sync_batchnorm(model, device), count_batchnorms(model)  # --train.sync_bn
    summarize_model, format_summary, estimate_training_memory, measure_training_memory  # accounting
    OFFLINE_PRETRAINED
"""
from fgclf.models._checkpoint import read_checkpoint_config, save_pretrained
from fgclf.models._factory import (
    check_model_name, count_parameters, create_model, list_models, resolve_data_config, unwrap_model,
)
from fgclf.models._offline import OFFLINE_PRETRAINED
from fgclf.models._peft import apply_peft, default_target_modules, list_peft_methods
from fgclf.models._syncbn import GlobalBatchNorm, convert_sync_batchnorm, count_batchnorms
from fgclf.models._summary import (ModelSummary, estimate_training_memory, format_memory, format_summary,
                                   measure_training_memory, summarize_model)

__all__ = [
    "ModelSummary", "estimate_training_memory", "format_memory", "format_summary", "measure_training_memory",
    "summarize_model", "OFFLINE_PRETRAINED", "GlobalBatchNorm", "apply_peft", "convert_sync_batchnorm",
    "count_batchnorms", "check_model_name", "count_parameters", "create_model",
    "default_target_modules", "list_models", "list_peft_methods", "read_checkpoint_config",
    "resolve_data_config", "save_pretrained", "unwrap_model",
]
