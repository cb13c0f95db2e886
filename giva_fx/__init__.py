"""giva-fx: GiVA gradient-informed vector adapters for any PyTorch model, by graph rewriting.

    adapted = giva_fx.adapt(model, batch, rank=8)   # capture -> match -> profile -> bases -> rewrite
    ...train adapted in plain PyTorch...
    giva_fx.merge(adapted, model)                   # fold dW into the original model object
"""
from giva_fx.adapt import AdaptConfig, adapt
from giva_fx.errors import (AdapterFileError, BatchError, CaptureError, ConfigError, ExportError, GivaError,
                            GivaWarning, LossError, MatchError)
from giva_fx.distributed import DistributedError
from giva_fx.fingerprint import fingerprint
from giva_fx.merge import merge, unmerge
from giva_fx.model import AdaptReport, GivaModel
from giva_fx.passes.bases import INIT_MODES
from giva_fx.persist import load_adapter, save_adapter
from giva_fx.summary import Summary, summary
from giva_fx.trainable import trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "AdaptConfig", "AdaptReport", "AdapterFileError", "BatchError", "CaptureError", "ConfigError", "DistributedError", "ExportError", "GivaError",
    "GivaModel", "GivaWarning", "INIT_MODES", "LossError", "MatchError", "Summary", "adapt", "fingerprint", "load_adapter", "merge",
    "save_adapter", "summary", "trainable_parameters", "unmerge", "__version__",
]
