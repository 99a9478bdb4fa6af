"""The ``vitconvert`` command line: a thin typer layer over the Python API.

Every user mistake raises :class:`~vitconvert.errors.UserError`; :func:`main` prints it as one line on
stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import vitconvert
from vitconvert.api import output_dir_for
from vitconvert.backbones import describe_family
from vitconvert.calibration import calibrate as run_calibrate
from vitconvert.demo import run_demo
from vitconvert.errors import UserError
from vitconvert.evaluation import evaluate as run_evaluate
from vitconvert.operating import format_point
from vitconvert.publish import push as run_push
from vitconvert.registry import get_method
from vitconvert.sources import parse_model_kwargs
from vitconvert.train import finetune as run_finetune

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
    rec = vitconvert.load_recipe(recipe, set_)
    dest = output or output_dir_for(model, rec)
    if dest.exists() and not overwrite:
        raise UserError(f"{str(dest)!r} already exists; pass --overwrite to replace it or choose another -o")
    with console.status(f"converting {model} with recipe {rec.name} ..."):
        converted = vitconvert.apply(model, rec, checkpoint=checkpoint, model_kwargs=_kwargs(model_kwargs),
                                     pretrained=pretrained)
    with console.status(f"writing {dest} ..."):
        path = vitconvert.save(converted, dest, overwrite=overwrite)
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
        anatomy = vitconvert.inspect_model(model, checkpoint, _kwargs(model_kwargs), pretrained)
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
    for rec in vitconvert.list_recipes():
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
        "--budget", help="GMACs (2.1), a share of the base ('50%'), or 'drop=0.5'")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of updating DIR")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    max_images: Annotated[int | None, typer.Option("--max-images")] = None,
    device: DeviceOpt = None,
) -> None:
    """Choose the operating point for a budget on held-out training images; store the curve."""
    summary = run_calibrate(model_dir, data, budget, output, overwrite=overwrite, max_images=max_images, device=device)
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
    summary = run_evaluate(model_dir, data, output, budget=budget, batch_size=batch_size, device=device,
                  max_images=max_images)
    _print_dict("evaluation", summary)


@app.command()
def push(
    model_dir: Annotated[Path, typer.Argument(help="converted-model folder")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="OWNER/NAME on the Hub")],
    private: Annotated[bool, typer.Option("--private")] = False,
    revision: Annotated[str | None, typer.Option("--revision", "--branch", help="branch to push to")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="Hub token (default: HF_TOKEN or the saved login)")] = None,
) -> None:
    """Upload a converted model (safetensors, config, card) to the Hugging Face Hub."""
    url = run_push(model_dir, repo_id, private=private, revision=revision, commit_message=commit_message, token=token)
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="vitconvert", standalone_mode=False)
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written")
        sys.exit(130)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
