"""The `giva-fx` command line: inspect, adapt, export and train from the shell.

Each command resolves its MODEL and data specs (`giva_fx.specs`) and calls the public API; the
commands hold no logic of their own. Exit codes: 0 success, 2 bad usage, 1 failure. A failure is
one line on stderr; `--verbose` adds the traceback.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from giva_fx.adapters import ADAPTERS
from giva_fx.errors import ConfigError, GivaError, GivaWarning
from giva_fx.specs import (DataFormat, DataOptions, LoadedModel, ModelOptions, SpecError, default_batch,
                           load_batches, load_model, parse_model_args, trainer_format)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

MODEL_HELP = """\b
MODEL is one of:
  hf:DIR          a Hugging Face model directory (config.json + *.safetensors)
  hf:CONFIG.json  a Hugging Face config: random weights (seed 0)
  timm:NAME       timm.create_model(NAME, pretrained=False), weights from --checkpoint
  py:MOD:FN       FN(**model args) from module MOD or file MOD.py (this RUNS that code)
"""

DATA_HELP = """\b
DATA is one of:
  FILE.safetensors / FILE.npz   named tensors, one row per sample (npz: no pickles)
  FILE.txt / FILE.jsonl         one text per line / {"text": ..., "label": ...} per line,
                                tokenized with the tokenizer in the hf: model directory
  DIR                           an image folder DIR/<class>/<image>
  --synthetic SPEC              random tensors for a dry run: NAME=DIMS[:KIND],... with KIND
                                float (default), int<N or ones; e.g. "x=8x3x32x32,y=8:int<10"
                                or "input_ids=4x16:int<100,labels=4:int<3" (DIMS of one batch)
Hugging Face models take the tensors as keyword inputs (labels -> their own loss); other
models take `labels`, `target` or `y` as the target and the other tensor as input.
"""


class GivaCommand(click.Command):
    """A command whose failures are one line (exit 1, or 2 for bad options) and whose warnings
    from giva-fx print as `warning: ...` lines (others only with --verbose)."""

    def invoke(self, ctx: click.Context) -> Any:
        verbose = bool(ctx.params.get("verbose"))

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            if verbose or issubclass(category, GivaWarning):
                click.echo(f"warning: {message}", err=True)

        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except ConfigError as exc:
                if verbose:
                    traceback.print_exc()
                raise click.UsageError(str(exc), ctx) from exc
            except Exception as exc:  # everything else is a failure: one line, traceback on request
                if verbose:
                    traceback.print_exc()
                raise click.ClickException(_one_line(exc, verbose)) from exc


def _one_line(exc: BaseException, verbose: bool) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, GivaError):
        return text
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or text}: {exc.filename}"
    return f"{type(exc).__name__}: {text}" + ("" if verbose else " (run again with --verbose for the traceback)")


def _patterns(values: Sequence[str]) -> tuple[str, ...]:
    """Repeated or comma-separated glob patterns."""
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def _compose(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


verbose_option = click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and all warnings.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")

model_options = _compose(
    click.argument("model", metavar="MODEL"),
    click.option("--task", help="hf: the model class, e.g. sequence-classification, causal-lm "
                                "(default: the config's architecture)."),
    click.option("--num-labels", type=click.IntRange(1), help="hf: number of labels of a classification head."),
    click.option("--num-classes", type=click.IntRange(0), help="timm: number of classes of the head."),
    click.option("--img-size", type=click.IntRange(1), help="timm: input image size; also the size image "
                                                             "folders are resized to."),
    click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                 help="timm: weights as a .safetensors state dict."),
    click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                 help="Extra constructor argument (hf: config field, timm: create_model kwarg, py: "
                      "factory kwarg); VALUE is parsed as JSON when it can be. Repeatable."),
)


def data_options(flag: str) -> Callable:
    return _compose(
        click.option(flag, "data", metavar="DATA", help="Sample data (see DATA below), or --synthetic."),
        click.option("--synthetic", metavar="SPEC", help="Random sample data instead of DATA, e.g. "
                                                         "\"x=8x3x32x32,y=8:int<10\"."),
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
                     help="Rows per batch from DATA (a synthetic SPEC gives its own)."),
        click.option("--max-length", type=click.IntRange(1), default=128, show_default=True,
                     help="Text data: tokens per sample, at most."),
    )


selection_options = _compose(
    click.option("--targets", multiple=True, metavar="GLOB", help="Adapt only weights matching these patterns "
                                                                  "(repeatable or comma-separated)."),
    click.option("--exclude", multiple=True, metavar="GLOB", help="Do not adapt weights matching these patterns."),
    click.option("--train", "train_full", multiple=True, metavar="GLOB",
                 help="Parameters to train in full, e.g. a new classifier head."),
    click.option("--kind", "kinds", multiple=True, type=click.Choice(list(ADAPTERS)),
                 help=f"Op kinds to adapt (repeatable) [default: {', '.join(ADAPTERS)}]."),
)


def _selection(params: dict[str, Any]) -> dict[str, Any]:
    """adapt()'s op selection keywords for the options given (the others keep adapt()'s defaults)."""
    given = {"targets": _patterns(params.pop("targets")), "exclude": _patterns(params.pop("exclude")),
             "train": _patterns(params.pop("train_full")), "kinds": params.pop("kinds")}
    return {k: v for k, v in given.items() if v}


def _load_model(params: dict[str, Any]) -> LoadedModel:
    try:
        options = ModelOptions(task=params["task"], num_labels=params["num_labels"],
                               num_classes=params["num_classes"], img_size=params["img_size"],
                               checkpoint=params["checkpoint"], model_args=parse_model_args(params["model_args"]))
        return load_model(params["model"], options)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="MODEL") from exc


def _load_batches(fmt: DataFormat, params: dict[str, Any], flag: str, count: int | None,
                  seed: int = 0, drop_last: bool = False) -> list[Any]:
    data, synthetic = params["data"], params["synthetic"]
    if data is not None and synthetic is not None:
        raise click.UsageError(f"give {flag} or --synthetic, not both")
    if data is None and synthetic is None:
        raise click.UsageError(f"missing sample data: pass {flag} DATA or --synthetic SPEC (see --help)")
    options = DataOptions(max_length=params["max_length"], img_size=params.get("img_size"), seed=seed)
    try:
        return load_batches(fmt, data=data, synthetic=synthetic, batch_size=params["batch_size"],
                            count=count, drop_last=drop_last, options=options)
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint=flag if synthetic is None else "--synthetic") from exc


def _check_output(path: Path, overwrite: bool, flag: str) -> None:
    if path.exists() and not overwrite:
        raise click.BadParameter(f"{path} exists; pass --overwrite to replace it", param_hint=flag)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="giva-fx")
def cli() -> None:
    """Fine-tune any PyTorch model with GiVA gradient-informed vector adapters.

    \b
    A typical run:
      giva-fx inspect hf:./bert --synthetic "input_ids=4x16:int<100"
      giva-fx adapt   hf:./bert --batch train.jsonl --rank 8 --out adapter.safetensors
      giva-fx export  hf:./bert --adapter adapter.safetensors --batch train.jsonl --training-artifacts art
      giva-fx train   art --data train.jsonl --tokenizer ./bert --steps 200 --lr 1e-3
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # specs are local: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars are the ones that matter
    if "transformers" in sys.modules:  # already imported (the environment is read at import)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on import


@cli.command(cls=GivaCommand, context_settings=CONTEXT, epilog=MODEL_HELP + "\n" + DATA_HELP)
@model_options
@data_options("--batch")
@click.option("--rank", "-r", type=click.IntRange(1), default=8, show_default=True, help="Adapter rank r per op.")
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for programs instead of tables.")
@verbose_option
def inspect(as_json: bool, rank: int, verbose: bool, **params: Any) -> None:
    """Show which ops of MODEL would be adapted and what it costs next to LoRA and VeRA.

    Traces MODEL on one sample batch (no gradients are computed) and lists each op to adapt
    (weight, kind, shape, rank after clamping, trainable parameters), each op skipped and why,
    and the totals of GiVA, LoRA at the same rank and VeRA at 8x the rank. Without --batch or
    --synthetic, a batch of the model's own input shape is made up when it can be.

    \b
    Example:
      giva-fx inspect timm:vit_tiny_patch16_224 --img-size 32 --rank 4
    """
    from giva_fx.inspection import inspect_model

    model = _load_model(params)
    if params["data"] is None and params["synthetic"] is None:
        try:
            batch = default_batch(model)
        except SpecError as exc:
            raise click.UsageError(f"{exc}; pass --batch DATA or --synthetic SPEC") from exc
    else:
        batch = _load_batches(model.data, params, "--batch", count=1)[0]
    report = inspect_model(model.module, batch, rank=rank, **_selection(params))
    if as_json:
        click.echo(json.dumps({"model": model.spec, **report.as_dict()}, indent=2))
    else:
        click.echo(model.describe())
        click.echo(str(report))


@cli.command(cls=GivaCommand, context_settings=CONTEXT, epilog=MODEL_HELP + "\n" + DATA_HELP)
@model_options
@data_options("--batch")
@click.option("--rank", "-r", type=click.IntRange(1), default=8, show_default=True, help="Adapter rank r per op.")
@click.option("--init", type=click.Choice(["Vr", "VrUr", "VrU2r", "VrUrand", "random"]), default="Vr",
              show_default=True, help="How the bases are made from the gradient (random: VeRA-like).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Adapter file to write (.safetensors).")
@selection_options
@click.option("--batches", type=click.IntRange(1), default=4, show_default=True,
              help="Batches to average the gradient over.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bases and synthetic data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@overwrite_option
@verbose_option
def adapt(rank: int, init: str, out: Path, batches: int, seed: int, quiet: bool, overwrite: bool, verbose: bool,
          **params: Any) -> None:
    """Profile gradients of MODEL on sample data and write a GiVA adapter file.

    The file holds the frozen bases, the trainable vectors and the settings: a small fraction of
    the model's size. Load it with giva_fx.load_adapter(model, path, sample_batch).

    \b
    Example:
      giva-fx adapt hf:./bert --batch train.jsonl --rank 8 --init Vr --out adapter.safetensors
    """
    import giva_fx

    _check_output(out, overwrite, "--out")
    model = _load_model(params)
    samples = _load_batches(model.data, params, "--batch", count=batches, seed=seed)
    adapted = giva_fx.adapt(model.module, samples, rank=rank, init=init, seed=seed, progress=not quiet,
                            **_selection(params))
    giva_fx.save_adapter(adapted, out)
    s = giva_fx.summary(adapted)
    report = adapted.report
    click.echo(f"adapted {len(s.ops)} ops of {model.describe()} on {len(samples)} batch(es) "
               f"in {report.total_s:.1f}s (profile {report.profile_s:.1f}s, bases {report.bases_s:.1f}s)")
    click.echo(f"trainable: {s.trainable:,} ({100 * s.trainable / max(s.base_params, 1):.4f}% of "
               f"{s.base_params:,}); LoRA at rank {rank}: {s.lora_equivalent:,}")
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes)")


@cli.command(cls=GivaCommand, context_settings=CONTEXT, epilog=MODEL_HELP + "\n" + DATA_HELP)
@model_options
@data_options("--batch")
@click.option("--adapter", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Adapter file written by `giva-fx adapt`.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write an inference ONNX model (inputs -> logits) here.")
@click.option("--merged/--unmerged", default=True, show_default=True,
              help="ONNX: fold dW into the weights, or keep each adapter as a subgraph with named vectors.")
@click.option("--training-artifacts", "artifacts", type=click.Path(file_okay=False, path_type=Path),
              help="Write ONNX Runtime training artifacts for the adapter vectors into this directory.")
@click.option("--loss", type=click.Choice(["cross_entropy", "mse", "model"]), default="cross_entropy",
              show_default=True, help="Training artifacts: the loss (model: the model's own, e.g. HF given labels).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True,
              help="Training artifacts: the optimizer (AdamW with torch's defaults).")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Refuse an adapter trained on other weights (--no-strict: apply where shapes fit, warn).")
@overwrite_option
@verbose_option
def export(adapter: Path, onnx_path: Path | None, merged: bool, artifacts: Path | None, loss: str,
           optimizer: str, strict: bool, overwrite: bool, verbose: bool, **params: Any) -> None:
    """Export MODEL with an adapter to ONNX, or to ONNX Runtime training artifacts.

    The sample batch (--batch or --synthetic) fixes the graph's inputs: give data of the form the
    model will see (with labels or a target for training artifacts; axes of batch and sequence
    stay dynamic).

    \b
    Examples:
      giva-fx export hf:./bert --adapter adapter.safetensors --batch train.jsonl --onnx bert.onnx
      giva-fx export hf:./bert --adapter adapter.safetensors --batch train.jsonl \\
          --training-artifacts artifacts --loss cross_entropy
    """
    import giva_fx
    from giva_fx import export as giva_export

    if onnx_path is None and artifacts is None:
        raise click.UsageError("nothing to export: pass --onnx FILE and/or --training-artifacts DIR")
    for path, flag in ((onnx_path, "--onnx"), (artifacts, "--training-artifacts")):
        if path is not None:
            _check_output(path, overwrite, flag)
    model = _load_model(params)
    sample = _load_batches(model.data, params, "--batch", count=1)[0]
    try:
        adapted = giva_fx.load_adapter(model.module, adapter, sample, strict=strict)
    except giva_fx.AdapterFileError as exc:  # say the option's command-line name
        if verbose:
            traceback.print_exc()
        raise click.ClickException(_one_line(exc, verbose).replace("strict=False", "--no-strict")) from exc
    click.echo(f"loaded {adapter} onto {model.describe()}: {len(adapted.adapters())} adapters")
    if onnx_path is not None:
        giva_export.onnx(adapted, sample, onnx_path, merged=merged)
        click.echo(f"wrote {onnx_path} ({'merged' if merged else 'unmerged'}, "
                   f"{onnx_path.stat().st_size:,} bytes)")
    if artifacts is not None:
        giva_export.training_artifacts(adapted, sample, artifacts, loss=loss, optimizer=optimizer,
                                       overwrite=overwrite)
        size = sum(f.stat().st_size for f in artifacts.iterdir())
        click.echo(f"wrote {artifacts}/ (loss {loss}, optimizer {optimizer}, {size:,} bytes)")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise click.BadParameter(f"{text!r} is not three comma-separated numbers, e.g. 0.5,0.5,0.5", param_hint=flag)
    return values


TRAIN_DATA_HELP = """\b
DATA is one of:
  FILE.safetensors / FILE.npz   named tensors, one row per sample, named like the graph inputs
  FILE.txt / FILE.jsonl         text, tokenized with --tokenizer DIR (a Hugging Face directory)
  DIR                           an image folder DIR/<class>/<image>, resized to --img-size and
                                normalised with --mean/--std (use the model's own, as adapt did)
  --synthetic SPEC              random tensors: NAME=DIMS[:KIND],... (see `giva-fx adapt --help`)
"""


@cli.command(cls=GivaCommand, context_settings=CONTEXT, epilog=TRAIN_DATA_HELP)
@click.argument("artifacts", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@data_options("--data")
@click.option("--steps", type=click.IntRange(1), required=True, help="Optimizer steps (batches cycle).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Learning rate (the peak, with --warmup-steps).")
@click.option("--warmup-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Linear warm-up, then linear decay to 0 at --steps (0: constant rate).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to write [default: DIR/trained.ckpt].")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the trained inference ONNX model (inputs -> logits) here.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from this checkpoint instead of DIR's initial one.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Text data: the Hugging Face directory holding the tokenizer.")
@click.option("--img-size", type=click.IntRange(1), help="Image folders: resize to this size.")
@click.option("--mean", help="Image folders: per-channel mean, e.g. 0.5,0.5,0.5.")
@click.option("--std", help="Image folders: per-channel std, e.g. 0.5,0.5,0.5.")
@click.option("--device", default="cpu", show_default=True, help="ONNX Runtime device (cpu, cuda).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthetic data and image order.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@overwrite_option
@verbose_option
def train(artifacts: Path, steps: int, lr: float, warmup_steps: int, out: Path | None, onnx_path: Path | None,
          resume: Path | None, tokenizer: Path | None, img_size: int | None, mean: str | None, std: str | None,
          device: str, seed: int, quiet: bool, overwrite: bool, verbose: bool, **params: Any) -> None:
    """Train the adapter vectors with ONNX Runtime from the artifacts in DIR (on-device style).

    Runs --steps optimizer steps over the full batches of DATA (cycling; a short last batch is
    left out), shows the loss, and writes a checkpoint (load it into PyTorch with
    giva_fx.export.load_ort_checkpoint) and, with --onnx, the trained inference model. No PyTorch
    model is needed. Give batches shaped like the sample the artifacts were exported with.

    \b
    Example:
      giva-fx train artifacts --data train.safetensors --steps 200 --lr 1e-3 --onnx trained.onnx
    """
    from tqdm.auto import tqdm

    from giva_fx.export import OrtTrainer

    out = out or artifacts / "trained.ckpt"
    _check_output(out, overwrite, "--out")
    if onnx_path is not None:
        _check_output(onnx_path, overwrite, "--onnx")
    if warmup_steps >= steps:
        raise click.BadParameter(f"{warmup_steps} is not below --steps {steps}", param_hint="--warmup-steps")
    fmt = trainer_format(artifacts, tokenizer_dir=tokenizer, image_size=img_size,
                         mean=_floats(mean, "--mean") or (0.0, 0.0, 0.0), std=_floats(std, "--std") or (1.0, 1.0, 1.0))
    params["img_size"] = img_size
    # a synthetic dry run cycles over a few distinct batches
    batches = _load_batches(fmt, params, "--data", count=None if params["synthetic"] is None else min(steps, 16),
                            seed=seed, drop_last=True)
    trainer = OrtTrainer(artifacts, lr=lr, warmup_steps=warmup_steps,
                         total_steps=steps if warmup_steps else None, checkpoint=resume, device=device)
    before = trainer.evaluate(batches[0]).loss
    bar = tqdm(range(steps), desc="giva-fx: training", disable=quiet, unit="step")
    for step in bar:
        loss = trainer.step(batches[step % len(batches)])
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    after = trainer.evaluate(batches[0]).loss
    click.echo(f"trained {steps} steps on {len(batches)} batch(es); loss on the first batch: "
               f"{before:.4f} -> {after:.4f}")
    trainer.save(out)
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes)")
    if onnx_path is not None:
        trainer.export_inference(onnx_path)
        click.echo(f"wrote {onnx_path} ({onnx_path.stat().st_size:,} bytes)")


def main() -> None:
    """Console entry point (`giva-fx`)."""
    cli(prog_name="giva-fx")
