"""Export: ONNX inference models, ONNX Runtime on-device training of the adapter vectors and the way
back to PyTorch, and PEFT LoRA adapters. onnx / onnxruntime are imported only when an export runs."""
from giva_fx.export.inference import onnx
from giva_fx.export.ort_training import training_artifacts
from giva_fx.export.peft_lora import peft_lora
from giva_fx.export.trainer import Evaluation, OrtTrainer, load_ort_checkpoint

__all__ = ["Evaluation", "OrtTrainer", "load_ort_checkpoint", "onnx", "peft_lora", "training_artifacts"]
