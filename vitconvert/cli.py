"""The ``vitconvert`` command line: a thin typer layer over the Python API.

Every user mistake raises :class:`~vitconvert.errors.UserError`; :func:`main` prints it as one line on
stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
import typer.main
from rich.console import Console
from rich.table import Table

from vitconvert.api import apply as run_apply
from vitconvert.api import inspect_model, output_dir_for
from vitconvert.backbones import describe_family
from vitconvert.calibration import calibrate as run_calibrate
from vitconvert.demo import run_demo
from vitconvert.deploy import export as run_export
from vitconvert.errors import Interrupted, UserError, one_line
from vitconvert.evaluation import evaluate as run_evaluate
from vitconvert.operating import Budget, format_point
from vitconvert.publish import push as run_push
from vitconvert.recipes import list_recipes, load_recipe
from vitconvert.registry import get_method
from vitconvert.saving import check_output_dir, save
from vitconvert.sources import parse_model_kwargs
from vitconvert.train import finetune as run_finetune

try:  # typer >= 0.17 bundles its own copy of click and raises that copy's exceptions
    import typer._click.exceptions as _typer_click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    _typer_click_exceptions = None

app = typer.Typer(
    name="vitconvert",
    help="Convert pretrained timm vision transformers into dynamic-token models, fine-tune, evaluate, push.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ModelArg = Annotated[str, typer.Argument(help="timm name or alias (deit_small), hf-hub:OWNER/NAME or local-dir:PATH")]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="weights file (.safetensors, .pth, .bin)")]
KwargsOpt = Annotated[list[str] | None, typer.Option(
    "--model-kwargs", help="timm create_model kwargs, key=value (e.g. img_size=32 num_classes=10)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="recipe override key=value (e.g. model.alpha=0.6)")]
DATA_HELP = "ImageFolder, hfds/PATH (local Hugging Face dataset), a .tar or a folder of .tar shards"
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")]


def _kwargs(items: list[str] | None) -> dict:
    return parse_model_kwargs(items)


@app.command()
def apply(
    model: ModelArg,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name (see `vitconvert recipes`) or YAML path")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="output folder (default MODEL-RECIPE)")] = None,
    checkpoint: CheckpointOpt = None,
    model_kwargs: KwargsOpt = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="load the source's weights")] = True,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
) -> None:
    """Convert MODEL with a recipe and write a converted-model folder."""
    rec = load_recipe(recipe, set_)
    dest = output or output_dir_for(model, rec)
    check_output_dir(dest, overwrite)  # before the conversion, not after it
    with console.status(f"converting {model} with recipe {rec.name} ..."):
        converted = run_apply(model, rec, checkpoint=checkpoint, model_kwargs=_kwargs(model_kwargs),
                                     pretrained=pretrained)
    with console.status(f"writing {dest} ..."):
        path = save(converted, dest, overwrite=overwrite)
    table = Table(title=f"{converted.base_spec.architecture} -> {rec.method}", show_header=False)
    table.add_row("output", str(path))
    table.add_row("family", converted.anatomy.family)
    table.add_row("base GMACs", f"{converted.base_gmacs:.3f}")
    for key, value in converted.method_state().get("costs", {}).items():
        table.add_row(f"{key} stage GMACs", f"{value:.3f}")
    table.add_row("operating point", format_point(converted.operating_point))
    out.print(table)


@app.command()
def inspect(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    model_kwargs: KwargsOpt = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained")] = False,
) -> None:
    """Print the anatomy the fx reader finds in MODEL (patch embedding, blocks, stages, head)."""
    with console.status(f"tracing {model} ..."):
        anatomy = inspect_model(model, checkpoint, _kwargs(model_kwargs), pretrained)
    table = Table(title=f"anatomy of {model}", show_header=False)
    for part, desc in anatomy.rows():
        table.add_row(part, desc)
    out.print(table)


@app.command()
def recipes() -> None:
    """List the recipes that ship with vitconvert."""
    table = Table(title="recipes")
    for col in ("recipe", "method", "families", "description"):
        table.add_column(col)
    for rec in list_recipes():
        fams = ", ".join(describe_family(f) for f in get_method(rec.method).families)
        table.add_row(rec.name, rec.method, fams, rec.description)
    out.print(table)


@app.command()
def finetune(
    model_dir: Annotated[str, typer.Argument(help="converted-model folder or hf-hub:OWNER/NAME")],
    data: Annotated[str, typer.Option("--data", help=DATA_HELP)],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="output folder (default DIR-ft)")] = None,
    labels: Annotated[bool, typer.Option(
        "--labels/--no-labels", help="add cross-entropy on the folder's labels")] = True,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    device: DeviceOpt = None,
    max_images: Annotated[int | None, typer.Option("--max-images", help="use at most N training images")] = None,
) -> None:
    """Fine-tune a converted model by distilling from its original (labels optional)."""
    path = run_finetune(model_dir, data, output, labels=labels, overrides=set_, resume=resume, overwrite=overwrite,
               device=device, max_images=max_images)
    out.print(f"fine-tuned model written to {path}")


@app.command()
def calibrate(
    model_dir: Annotated[str, typer.Argument(help="converted-model folder")],
    data: Annotated[str, typer.Option("--data", help=DATA_HELP + "; a held-out share is used")],
    budget: Annotated[str | None, typer.Option(
        "--budget", help="GMACs (2.1), a share of the base ('50%'), 'drop=0.5', a speed-up measured here "
                         "('speed=2x') or 'best' (the most accurate point)")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of updating DIR")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    max_images: Annotated[int | None, typer.Option("--max-images")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per pass (and the batch speed budgets "
                                                                 "are timed at)")] = 64,
    device: DeviceOpt = None,
    speed_check: Annotated[bool | None, typer.Option(
        "--speed-check/--no-speed-check", help="time the chosen point against the base model here and choose "
                                               "again while it is slower (default: the recipe's, on)")] = None,
) -> None:
    """Choose the operating point for a budget on held-out training images; store the curve."""
    summary = run_calibrate(model_dir, data, Budget.parse(budget) if budget is not None else None, output,
                            overwrite=overwrite, max_images=max_images,
                            device=device, batch_size=batch_size, check_speed=speed_check)
    _print_dict("calibration", summary)


@app.command("eval")
def evaluate(
    model_dir: Annotated[str, typer.Argument(help="converted-model folder or hf-hub:OWNER/NAME")],
    data: Annotated[str, typer.Option("--data", help=DATA_HELP + " (its val/ split if present, else held out)")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="folder for eval.json and eval.png")] = None,
    budget: Annotated[str | None, typer.Option("--budget")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
    device: DeviceOpt = None,
    max_images: Annotated[int | None, typer.Option("--max-images")] = None,
) -> None:
    """Top-1/top-5, expected GMACs, exit shares and throughput against the base model."""
    summary = run_evaluate(model_dir, data, output, budget=Budget.parse(budget) if budget is not None else None,
                           batch_size=batch_size, device=device,
                  max_images=max_images)
    _print_dict("evaluation", summary)


@app.command("export")
def export_model(
    model_dir: Annotated[str, typer.Argument(help="converted-model folder or hf-hub:OWNER/NAME")],
    format_: Annotated[str, typer.Option("--format", help="onnx (onnxruntime, OpenVINO...) or torch-export (.pt2)")
                       ] = "onnx",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write (default DIR/model.onnx or "
                                                                       "DIR/model.pt2)")] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's)")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="export at this point of the calibration curve")
                      ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    optimize: Annotated[bool, typer.Option("--optimize/--no-optimize", help="run the ONNX exporter's graph "
                                           "optimiser (--no-optimize: about half the export time)")] = True,
) -> None:
    """Export one graph with the dynamic path inside (per-image exits), checked against the eager model."""
    path = run_export(model_dir, output, format=format_, opset=opset,  # type: ignore[arg-type]
                      budget=Budget.parse(budget) if budget is not None else None, overwrite=overwrite,
                      optimize=optimize)
    out.print(f"exported to {path}")


@app.command()
def push(
    model_dir: Annotated[Path, typer.Argument(help="converted-model folder")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="OWNER/NAME on the Hub")],
    private: Annotated[bool, typer.Option("--private")] = False,
    revision: Annotated[str | None, typer.Option("--revision", "--branch", help="branch to push to")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="Hub token (default: HF_TOKEN or the saved login)")] = None,
    with_onnx: Annotated[bool, typer.Option(
        "--with-onnx", help="also export the model to ONNX (checked against it first) and upload model.onnx, with "
                            "a card section on running it in onnxruntime; needs the export extra")] = False,
) -> None:
    """Upload a converted model (safetensors, config, card; ONNX with --with-onnx) to the Hugging Face Hub."""
    url = run_push(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
                   with_onnx=with_onnx)
    out.print(f"pushed to {url}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--out", "-o", help="work folder")] = Path("vitconvert-demo"),
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe to apply")] = "cfvit",
    epochs: Annotated[float, typer.Option("--epochs", help="fine-tuning epochs")] = 1.0,
    budget: Annotated[str, typer.Option("--budget", help="calibration budget")] = "50%",
    model: Annotated[str | None, typer.Option("--model", help="base model (default: the shipped CIFAR-10 ViT)")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="image folder (default: the shipped sample)")] = None,
    set_: SetOpt = None,
    max_images: Annotated[int | None, typer.Option("--max-images", help="at most N images per step")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """The whole mission offline: apply, fine-tune, calibrate, evaluate, plot, reload through timm."""
    s = run_demo(output, recipe=recipe, epochs=epochs, budget=budget, model=model, data=data, overrides=set_,
                 max_images=max_images, overwrite=overwrite)
    table = Table(title=f"vitconvert demo: cifar10-vit + {s['recipe']} (CIFAR-10 sample, not a benchmark)")
    for col in ("model", "top-1 (%)", "GMACs", "of base", "throughput vs base"):
        table.add_column(col)
    ratio = f"{s['throughput_ratio']:.2f}x" if s["throughput_ratio"] else "-"
    base_top1 = f"{s['base_top1']:.2f}" if s["base_top1"] is not None else "-"
    table.add_row("base", base_top1, f"{s['base_gmacs']:.4f}", "100%", "1.00x")
    table.add_row(f"{s['method']} at {format_point(s['point'])}", f"{s['top1']:.2f}", f"{s['gmacs']:.4f}",
                  f"{s['gmacs_share']:.0%}", ratio)
    out.print(table)
    out.print(f"{s['eval_images']} {s['eval_split']} images; operating point chosen for {s['budget']} on "
              f"{s['calibration_images']} held-out training images")
    out.print("seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    out.print(f"model: {s['model_dir']} (timm.create_model('local-dir:...') reload identical: "
              f"{s['timm_reload_identical']})")
    out.print("plots: " + ", ".join(s["plots"]))


def _print_dict(title: str, data: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list | dict):
            continue
        table.add_row(str(key), str(value))
    out.print(table)


# Options that take several space-separated key=value items (timm's train.py style).
_MULTI = ("--model-kwargs", "--set")


def normalise_argv(argv: list[str]) -> list[str]:
    """``--model-kwargs a=1 b=2 MODEL`` -> ``--model-kwargs a=1 --model-kwargs b=2 MODEL``."""
    result: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in _MULTI:
            current = arg
            result.append(arg)
            continue
        if current and result[-1] != current and "=" in arg and not arg.startswith("-"):
            result += [current, arg]
            continue
        if current and result[-1] == current:
            result.append(arg)
            continue
        current = None
        result.append(arg)
    return result


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """``name`` from click and from the copy of click that recent typer versions bundle (``typer._click``).

    typer raises its own copy's exceptions, which are not click's: both are caught by their real classes.
    """
    found: list[type[BaseException]] = []
    for module in (_typer_click_exceptions, click.exceptions, typer.exceptions):
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _click_classes("UsageError")
_CLICK_ERRORS = _click_classes("ClickException")
_EXITS = _click_classes("Exit")
_ABORTS = _click_classes("Abort")
_NO_ARGS = _click_classes("NoArgsIsHelpError")


def _fail(message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def _usage_message(e: BaseException) -> str:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "vitconvert"
    if isinstance(e, _NO_ARGS):
        if ctx is not None and ctx.parent is None:
            return f"no command given; run `{path} --help` for the commands (apply, finetune, eval, push ...)"
        return f"missing arguments; run `{path} --help` for its usage"
    text = e.format_message() if hasattr(e, "format_message") else str(e)
    return f"{text.rstrip('.')}; run `{path} --help` for its usage"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit 0 on success, 2 on a user mistake, 130 on Ctrl-C.

    The click command behind the typer app runs directly, so every exception arrives here as raised: typer's
    own loop would turn Ctrl-C into a silent exit status and print usage errors with tracebacks or panels.
    """
    args = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        with command.make_context("vitconvert", args) as ctx:
            command.invoke(ctx)
    except UserError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt as e:
        message = str(e) if isinstance(e, Interrupted) else "interrupted; nothing was written"
        console.print(one_line(message), highlight=False, soft_wrap=True, markup=False)
        sys.exit(130)
    except _EXITS as e:
        sys.exit(getattr(e, "exit_code", 0))
    except _ABORTS:
        console.print("aborted; nothing was written", highlight=False, markup=False)
        sys.exit(130)
    except _USAGE_ERRORS as e:
        _fail(_usage_message(e), 2)
    except _CLICK_ERRORS as e:
        _fail(e.format_message() if hasattr(e, "format_message") else str(e), 2)
    except BrokenPipeError:
        # The reader went away (`vitconvert recipes | head -1`): what it wanted was read, so this is not a failure.
        # Whatever is still buffered for the closed pipe goes nowhere, so the interpreter's exit does not report
        # the broken pipe again (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except SystemExit as e:
        # rich (our tables, typer's help) meets a closed pipe by pointing stdout at /dev/null and exiting 1; no
        # command of ours exits 1, so that is the same quiet end as above.
        if e.code == 1 and _stdout_is_devnull():
            sys.exit(0)
        raise


def _stdout_is_devnull() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    main()
