"""Model cards for converted models (README.md with Hub front matter).

What the card reads, all optional except the config's ``model_args``:

* ``config["model_args"]["state"]``: the operating point (``point``: ``{name: value}``), ``base_gmacs``,
  ``finetuned``, ``curve`` (points ``{point, gmacs, top1, extra}``, top-1 in percent; ``extra`` may hold
  ``throughput_ratio``) and ``calibration`` (``dataset``, ``dataset_id`` (Hub id), ``split``, ``images``,
  ``base_top1``, ``throughput_ratio`` as ``{knob: ratio}``, ``throughput`` as ``{device, batch_size, ...}``);
* ``<folder>/eval.json``: an evaluation, ``{"points": [{knob, top1, gmacs, throughput, throughput_ratio,
  latency_ms}], "dataset", "dataset_id", "split", "images", "device", "batch_size", "base": {top1, gmacs,
  throughput}}`` (or just the list of points); the knob may also be given under the method's knob name;
  tables are keyed by the main knob (the first of the point; ``config["vitconvert"]["point"]`` names them);
* ``<folder>/curve.png`` (calibration) and ``<folder>/eval.png`` (evaluation): plots, shown when present.

A push with ONNX (``vitconvert push --with-onnx``) adds a "Run with ONNX Runtime" section
(:func:`onnx_section`, :func:`set_onnx_section`) written from the exported file's inputs and outputs and the
config's data settings.

Only an explicit ``dataset_id`` becomes the front matter's ``datasets`` (a local folder's name could be
another Hub dataset's id).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from vitconvert.backbones import describe_family
from vitconvert.errors import UserError
from vitconvert.operating import Budget, format_point
from vitconvert.recipes import load_recipe
from vitconvert.registry import METHODS

EVAL_NAME = "eval.json"
ONNX_NAME = "model.onnx"
ONNX_HEADING = "## Run with ONNX Runtime"
PLOT_NAME = "curve.png"
EVAL_PLOT_NAME = "eval.png"
MAX_ROWS = 12
_OWNER_PLACEHOLDER = re.compile(r"hf-hub:OWNER/[A-Za-z0-9_.\-]+")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _state(config: dict[str, Any]) -> dict[str, Any]:
    """The config's state, with each curve point and the operating point also flattened to ``{name: value}``
    keys and ``knob`` (the main knob), which is what the tables read."""
    state = dict(config.get("model_args", {}).get("state") or {})
    main = _knob_name(config)
    if isinstance(state.get("point"), dict):
        state.update({k: v for k, v in state["point"].items() if k not in state})
    curve = []
    for p in state.get("curve") or []:
        if isinstance(p, dict) and isinstance(p.get("point"), dict):
            p = {**p["point"], **p, "knob": p["point"].get(main)}
        curve.append(p)
    state["curve"] = curve
    return state


def _knob_name(config: dict[str, Any]) -> str:
    info = config.get("vitconvert", {})
    names = info.get("point")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    return info.get("knob") or "knob"  # configs written by vitconvert <= 0.1


def _hub_id(base: dict[str, Any]) -> str | None:
    hub_id = base.get("hub_id")
    return hub_id.split("@")[0] if isinstance(hub_id, str) and hub_id else None


def _dataset_id(*sources: dict[str, Any]) -> str | None:
    """An explicit Hub dataset id (``dataset_id``); a local folder's name is never claimed as one."""
    for src in sources:
        if isinstance(src.get("dataset_id"), str) and _DATASET_ID.match(src["dataset_id"]):
            return src["dataset_id"]
    return None


def read_eval(folder: Path | None) -> dict[str, Any]:
    """``eval.json`` of a model folder as ``{"points": [...], ...}``; empty when absent or unreadable."""
    if folder is None or not (Path(folder) / EVAL_NAME).is_file():
        return {}
    try:
        data = json.loads((Path(folder) / EVAL_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if isinstance(data, list):
        data = {"points": data}
    if not isinstance(data, dict):
        return {}
    data["points"] = [p for p in data.get("points") or [] if isinstance(p, dict)]
    return data


def front_matter(config: dict[str, Any], evaluation: dict[str, Any] | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Hub metadata following the Hub's model-card spec: library, tags, lineage (``base_model`` with
    ``base_model_relation``), license, datasets, metrics, and the measured results as ``model-index``.

    Only what is known is claimed: no ``base_model`` without a Hub id for the base weights, no ``datasets``
    without an explicit Hub dataset id, no ``model-index`` without measured top-1 values.

    Args:
        config: The model's config.json content.
        evaluation: The folder's eval.json content (see :func:`read_eval`), if any.
        name: Model name for ``model-index`` (default: the base architecture and the method).

    Example:
        >>> front_matter(json.loads(Path("deit_small-cfvit/config.json").read_text()))["tags"]  # doctest: +SKIP
        ['image-classification', 'timm', 'vitconvert', 'cfvit', 'vit']
    """
    info = config.get("vitconvert", {})
    base = config["model_args"]["base"]
    pretrained_cfg = config.get("pretrained_cfg") or {}
    state = _state(config)
    calibration = state.get("calibration") or {}
    evaluation = evaluation or {}
    tags = ["image-classification", "timm", "vitconvert", info.get("method"), info.get("family")]
    meta: dict[str, Any] = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": list(dict.fromkeys(t for t in tags if t)),
    }
    # The weights derive from the base checkpoint, so its licence applies; say nothing when it is unknown.
    if pretrained_cfg.get("license"):
        meta["license"] = pretrained_cfg["license"]
    hub_id = _hub_id(base)
    if hub_id:
        meta["base_model"] = hub_id
        # The weights are the base model's, changed by conversion and (usually) training: a fine-tune.
        meta["base_model_relation"] = "finetune"
    dataset = _dataset_id(evaluation, calibration)
    if dataset:
        meta["datasets"] = [dataset]
    has_top1 = any("top1" in p for p in (state.get("curve") or []) + evaluation.get("points", []))
    if has_top1 or calibration.get("base_top1") is not None:
        meta["metrics"] = ["accuracy"]
    results = eval_results(config, evaluation)
    if results:
        from huggingface_hub import ModelCardData

        title = (name or f"{base['architecture']}-{info.get('method', '')}").rsplit("/", 1)[-1]
        meta["model-index"] = ModelCardData(model_name=title, eval_results=results).to_dict()["model-index"]
    return meta


def eval_results(config: dict[str, Any], evaluation: dict[str, Any] | None = None) -> list[Any]:
    """huggingface_hub ``EvalResult`` entries for the measured results: top-1 and GMACs of each calibrated
    operating point (held-out training images; at most :data:`MAX_ROWS`, spread over the curve) and of each
    evaluated point, with dataset and split. Empty when nothing was measured."""
    from huggingface_hub import EvalResult

    state = _state(config)
    knob_name = _knob_name(config)
    calibration = state.get("calibration") or {}
    evaluation = evaluation or {}
    results: list[Any] = []

    def add(points: list[dict[str, Any]], source: dict[str, Any], split: str, what: str) -> None:
        dataset_name = str(source.get("dataset") or "unknown")
        dataset_type = _dataset_id(source, calibration) or dataset_name
        others = _varying_knobs(points, knob_name)
        for p in points:
            knob, top1, gmacs = _knob_of(p, knob_name), _num(p.get("top1")), _num(p.get("gmacs"))
            if top1 is None:
                continue
            if others:
                at = _label(p, knob_name, others)
            else:
                at = f"{knob_name}={knob:g}" if knob is not None else "stored point"
            common = dict(task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                          dataset_split=split, metric_config=at)
            results.append(EvalResult(metric_type="accuracy", metric_value=round(top1, 2),
                                      metric_name=f"top-1 (%) at {at}, {what}", **common))
            if gmacs is not None:
                results.append(EvalResult(metric_type="gmacs", metric_value=round(gmacs, 5),
                                          metric_name=f"GMACs per image at {at}, {what}", **common))

    curve = sorted((p for p in state.get("curve") or [] if isinstance(p, dict)),
                   key=lambda p: (_num(p.get("gmacs")) or 0.0))
    add(_pick_rows(curve, _num(state.get(knob_name)), knob_name), calibration,
        str(calibration.get("split") or "held-out training images"), "calibration")
    add(evaluation.get("points") or [], evaluation, str(evaluation.get("split") or "evaluation"), "evaluation")
    return results


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    num = _num(value)
    return f"{num:{spec}}{suffix}" if num is not None else "–"


def _knob_of(point: dict[str, Any], knob_name: str) -> float | None:
    return _num(point.get("knob", point.get(knob_name)))


def _varying_knobs(points: list[dict[str, Any]], knob_name: str) -> list[str]:
    """The knobs other than the main one that take more than one value over ``points``: when there are any (CF-ViT
    calibrated over several alphas), a row is only identified by its whole point."""
    values: dict[str, set[float]] = {}
    for p in points:
        for name, value in (p.get("point") or {}).items():
            if name != knob_name and _num(value) is not None:
                values.setdefault(name, set()).add(float(value))
    return [name for name, seen in values.items() if len(seen) > 1]


def _label(point: dict[str, Any], knob_name: str, others: list[str]) -> str:
    """``0.48`` when the main knob identifies the row, ``eta=0.48, alpha=0.5`` when other knobs vary too."""
    knob = _knob_of(point, knob_name)
    if not others:
        return f"{knob:g}" if knob is not None else "–"
    named = {knob_name: knob, **{k: _num((point.get("point") or {}).get(k)) for k in others}}
    return format_point({k: v for k, v in named.items() if v is not None}) or "–"


def _distance(point: dict[str, Any], target: dict[str, Any], names: list[str]) -> float:
    return sum(abs((_num((point.get("point") or point).get(k)) or 0.0) - (_num(target.get(k)) or 0.0)) for k in names)


def _pick_rows(points: list[dict[str, Any]], keep: float | None, knob_name: str) -> list[dict[str, Any]]:
    """At most MAX_ROWS points spread over the curve, always with the ends and the stored operating point."""
    if len(points) <= MAX_ROWS:
        return points
    idx = {round(i * (len(points) - 1) / (MAX_ROWS - 2)) for i in range(MAX_ROWS - 1)}
    if keep is not None:
        idx.add(min(range(len(points)), key=lambda i: abs((_knob_of(points[i], knob_name) or 0.0) - keep)))
    return [points[i] for i in sorted(idx)]


def _ratio_for(knob: float | None, point: dict[str, Any], calibration: dict[str, Any],
               eval_points: list[dict[str, Any]], knob_name: str) -> float | None:
    extra = point.get("extra") or {}
    if _num(extra.get("throughput_ratio")) is not None:
        return _num(extra["throughput_ratio"])
    table = calibration.get("throughput_ratio")
    if isinstance(table, dict) and knob is not None:
        for key, value in table.items():
            try:
                if abs(float(key) - knob) < 1e-9:
                    return _num(value)
            except ValueError:
                continue
    for p in eval_points:
        k = _knob_of(p, knob_name)
        if knob is not None and k is not None and abs(k - knob) < 1e-9:
            return _num(p.get("throughput_ratio"))
    return None


def _budget_said(cal: dict[str, Any], adds_compute: bool) -> list[str]:
    """The sentence naming the budget that chose the default point (none for models calibrated before it was kept)."""
    text = cal.get("budget")
    if not text:
        return []
    try:
        budget = Budget.parse("best" if text == "best top-1" else text)
    except UserError:
        return []
    return [f"The default point was chosen by the budget `{budget}`: {budget.describe(adds_compute)}."]


def _curve_table(state: dict[str, Any], knob_name: str, evaluation: dict[str, Any], adds_compute: bool = False
                 ) -> list[str]:
    curve = sorted((p for p in state.get("curve") or [] if isinstance(p, dict)),
                   key=lambda p: (_num(p.get("gmacs")) or 0.0, _knob_of(p, knob_name) or 0.0))
    if not curve:
        return []
    cal = state.get("calibration") or {}
    current = _num(state.get(knob_name))
    base_gmacs = _num(state.get("base_gmacs"))
    rows = _pick_rows(curve, current, knob_name)
    others = _varying_knobs(curve, knob_name)
    ratios = [_ratio_for(_knob_of(p, knob_name), p, cal, evaluation.get("points", []), knob_name) for p in rows]
    with_ratio = any(r is not None for r in ratios)
    where = ", ".join(str(x) for x in (cal.get("dataset"), cal.get("split")) if x) or "held-out training images"
    images = f"{cal['images']} images, " if cal.get("images") else ""
    lines = [
        "## Operating points",
        "",
        f"Calibrated on {images}{where}; pick one with `vitconvert.load(..., budget=...)` (GMACs, `'50%'` of the "
        "base model's GMACs, `'drop=0.5'` top-1 points"
        + (", or `'speed=2x'` among the points whose throughput was measured)." if with_ratio else ")."),
        *_budget_said(cal, adds_compute),
        "",
        f"| {'operating point' if others else knob_name} | top-1 (%) | expected GMACs | of base GMACs |"
        + (" throughput vs base |" if with_ratio else ""),
        "|---|---|---|---|" + ("---|" if with_ratio else ""),
    ]
    if base_gmacs:
        base_row = f"| base model | {_fmt(cal.get('base_top1'), '.2f')} | {base_gmacs:.4g} | 100% |"
        lines.append(base_row + (" 1.00× |" if with_ratio else ""))
    names = [knob_name, *others]
    stored = {**(state.get("point") or {}), knob_name: current}
    closest = min(rows, key=lambda p: _distance(p, stored, names)) if current is not None else None
    for p, ratio in zip(rows, ratios, strict=True):
        label = _label(p, knob_name, others)
        if p is closest:
            label = f"**{label}** (default)"
        share = f"{_num(p.get('gmacs')) / base_gmacs:.0%}" if base_gmacs and _num(p.get("gmacs")) is not None else "–"
        line = f"| {label} | {_fmt(p.get('top1'), '.2f')} | {_fmt(p.get('gmacs'), '.4g')} | {share} |"
        lines.append(line + (f" {_fmt(ratio, '.2f', '×')} |" if with_ratio else ""))
    throughput = cal.get("throughput")
    if with_ratio and isinstance(throughput, dict) and throughput:
        lines += ["", "Throughput measured " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in throughput.items())
                  + "."]
    return [*lines, ""]


def _small_batch_lines(state: dict[str, Any]) -> list[str]:
    """What calibration measured at small batches, and the rule it stored (``state.small_batch``)."""
    record = (state.get("calibration") or {}).get("small_batch")
    if not isinstance(record, dict) or not isinstance(record.get("ratios"), dict) or not record["ratios"]:
        return []
    parts = [f"{_fmt(v, '.2f', '×')} at batch {k}" for k, v in record["ratios"].items()]
    measured = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    threads = record.get("threads")
    where = f"{threads} thread{'s' if threads != 1 else ''}"
    rule = state.get("small_batch")
    said = f"Timed against the base model at small batches ({where}), the chosen point ran at {measured} its speed"
    if isinstance(rule, dict) and _num(rule.get("below")) is not None:
        return [f"{said}, so batches of fewer than {rule['below']} images on {rule.get('device_type', 'cpu')} run at "
                "the dense point (the base model's computation with these weights), counted at its GMACs.", ""]
    return [f"{said}.", ""]


def _eval_table(evaluation: dict[str, Any], knob_name: str, plot: bool = False) -> list[str]:
    points = evaluation.get("points") or []
    if not points:
        return []
    columns = [("top1", "top-1 (%)", ".2f", ""), ("gmacs", "GMACs", ".4g", ""),
               ("throughput", "images/s", ".1f", ""), ("throughput_ratio", "throughput vs base", ".2f", "×"),
               ("latency_ms", "latency (ms)", ".2f", "")]
    columns = [c for c in columns if any(_num(p.get(c[0])) is not None for p in points)]
    context = ", ".join(str(evaluation[k]) for k in ("dataset", "split") if evaluation.get(k))
    details = ", ".join(f"{k.replace('_', ' ')} {evaluation[k]}" for k in ("images", "device", "batch_size")
                        if evaluation.get(k) is not None)
    lines = ["## Evaluation", ""]
    if context or details:
        lines += [f"Measured on {context or 'the evaluation set'}" + (f" ({details})" if details else "") + ".", ""]
    lines.append(f"| {knob_name} | " + " | ".join(c[1] for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    base = evaluation.get("base")
    if isinstance(base, dict):
        cells = [_fmt(base.get(c[0]), c[2], c[3]) if c[0] != "throughput_ratio" else "1.00×" for c in columns]
        lines.append("| base model | " + " | ".join(cells) + " |")
    for p in points:
        knob = _knob_of(p, knob_name)
        cells = [_fmt(p.get(c[0]), c[2], c[3]) for c in columns]
        lines.append(f"| {knob:g} | " if knob is not None else "| – | ")
        lines[-1] += " | ".join(cells) + " |"
    lines.append("")
    if plot:
        lines += [f"![top-1 against GMACs on the evaluation images]({EVAL_PLOT_NAME})", ""]
    return lines


def _repo_ref(name: str) -> str:
    return name if "/" in name else f"OWNER/{name}"


def fill_repo_id(card: str, repo_id: str) -> str:
    """Replace the ``hf-hub:OWNER/NAME`` placeholders a card was written with by the real repository id."""
    return _OWNER_PLACEHOLDER.sub(lambda _: f"hf-hub:{repo_id}", card)


def model_card(config: dict[str, Any], folder: Path | None = None, name: str | None = None) -> str:
    """Render README.md for a converted model config.

    Args:
        config: The model's config.json content.
        folder: The model folder, for files the card shows (``curve.png``) or reads (``eval.json``).
        name: Model name for the title, or ``OWNER/NAME`` to write loading snippets for that repository
            (otherwise they say ``hf-hub:OWNER/NAME``, which :func:`fill_repo_id` fills at push time).

    Example:
        >>> card = model_card(json.loads(Path("deit_small-cfvit/config.json").read_text()))  # doctest: +SKIP
    """
    info = config.get("vitconvert", {})
    args = config["model_args"]
    base, recipe, state = args["base"], args["recipe"], _state(config)
    method = info.get("method") or recipe.get("method", "")
    knob_name = _knob_name(config)
    folder = Path(folder) if folder is not None else None
    name = name or (folder.name if folder is not None else f"{base['architecture']}-{method}")
    title = name.rsplit("/", 1)[-1]
    repo = _repo_ref(name)
    evaluation = read_eval(folder)
    hub_id = _hub_id(base)
    method_desc = METHODS[method].description if method in METHODS else method
    source = (f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id
              else f"`{base.get('source') or base['architecture']}`")
    weights = ("random initialisation" if not base.get("pretrained")
               else f"checkpoint `{Path(base['checkpoint']).name}`" if base.get("checkpoint")
               else "its pretrained weights")
    current = _num(state.get(knob_name))
    others = {k: v for k, v in (state.get("point") or {}).items() if k != knob_name}
    finetune = recipe.get("finetune") or {}
    lines = [
        "---",
        yaml.safe_dump(front_matter(config, evaluation, name), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"`{base['architecture']}` ({describe_family(info.get('family', ''))}) converted by vitconvert with the "
        f"`{recipe.get('name', method)}` recipe: {method_desc}.",
        "",
        f"- Base model: {source}, from {weights}",
        f"- Method: `{method}`; operating point `{knob_name} = {current:g}`"
        + "".join(f", `{k} = {v:g}`" for k, v in others.items() if _num(v) is not None) if current is not None
        else f"- Method: `{method}`",
        f"- Base model GMACs: {_fmt(state.get('base_gmacs'), '.4g')}"
        + (f" at {'×'.join(str(v) for v in base['img_size'])} input" if base.get("img_size") else ""),
        "- Fine-tuned: " + (f"yes ({finetune.get('epochs', '?')} epochs, lr {finetune.get('lr', '?')})"
                            if state.get("finetuned") else "no (converted weights only)"),
        "",
    ]
    lines += _curve_table(state, knob_name, evaluation, method in METHODS and METHODS[method].adds_compute)
    lines += _small_batch_lines(state)
    if folder is not None and (folder / PLOT_NAME).is_file():
        lines += [f"![top-1 against expected GMACs]({PLOT_NAME})", ""]
    lines += _eval_table(evaluation, knob_name, folder is not None and (folder / EVAL_PLOT_NAME).is_file())
    lines += [
        "## How to load",
        "",
        "Loading never runs code from the repository: vitconvert rebuilds the model from `config.json` "
        "(validated first) and reads only `model.safetensors`.",
        "",
        "```python",
        "import timm",
        "import vitconvert  # registers the vitconvert_* architectures with timm",
        "",
        f"model = vitconvert.load('hf-hub:{repo}')                 # stored operating point",
        f"model = vitconvert.load('hf-hub:{repo}', budget='50%')   # or GMACs (2.1), or 'drop=0.5'",
        f"model = timm.create_model('hf-hub:{repo}', pretrained=True)",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).strip(),
        "```",
        "",
    ]
    lines += reproduce_section(config, evaluation, title)
    return "\n".join(lines)


def _recipe_args(recipe: dict[str, Any]) -> str:
    """``--recipe NAME`` plus ``--set`` for each value that differs from the shipped recipe of that name;
    ``--recipe recipe.yaml`` (the Recipe section above) when there is none."""
    try:
        shipped = load_recipe(str(recipe.get("name")))
        shipped = (shipped.for_family(recipe["family"]) if recipe.get("family") else shipped).to_dict()
    except UserError:
        return "--recipe recipe.yaml"
    changes: list[str] = []

    def walk(ours: Any, theirs: Any, prefix: str) -> bool:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            if set(ours) - set(theirs):
                return False
            return all(walk(v, theirs.get(k), f"{prefix}{k}.") for k, v in ours.items())
        if ours != theirs:
            value = json.dumps(ours) if not isinstance(ours, str) else ours
            changes.append(f"--set {prefix[:-1]}={value.replace(' ', '')}")
        return True

    if not walk(recipe, shipped, ""):
        return "--recipe recipe.yaml"
    return " ".join([f"--recipe {recipe['name']}", *changes])


def reproduce_section(config: dict[str, Any], evaluation: dict[str, Any], title: str) -> list[str]:
    """The "How to reproduce" section: the commands that made this model, from its config.

    ``DATA`` stands for the dataset the steps used (named in the text; local paths are not published).
    """
    args = config["model_args"]
    base, recipe, state = args["base"], args["recipe"], _state(config)
    calibration = state.get("calibration") or {}
    source = base.get("source") or ""
    apply = f"vitconvert apply {_recipe_args(recipe)} "
    if not source:
        apply += f"{base['architecture']}"
    elif source.startswith("local-dir:"):  # the folder's name only: local paths are not published
        apply += "local-dir:" + Path(source[len("local-dir:"):]).name
    else:
        apply += source
    if not base.get("pretrained"):
        apply += " --no-pretrained"
    if base.get("checkpoint"):
        apply += f" --checkpoint {Path(base['checkpoint']).name}"
    if not source.startswith(("local-dir:", "hf-hub:")):
        kwargs = [f"{k}={json.dumps(v).replace(' ', '')}" for k, v in (base.get("model_args") or {}).items()]
        apply += (" --model-kwargs " + " ".join(kwargs)) if kwargs else ""
    commands = [apply + f" -o {title}"]
    if state.get("finetuned"):
        commands.append(f"vitconvert finetune {title} --data DATA -o {title} --overwrite")
    if calibration:
        budget = calibration.get("budget")
        commands.append(f"vitconvert calibrate {title} --data DATA"
                        + (f" --budget {budget}" if budget and budget not in ("best", "best top-1") else ""))
    if evaluation.get("points"):
        commands.append(f"vitconvert eval {title} --data DATA")
    datasets = [str(x) for x in (calibration.get("dataset_id") or calibration.get("dataset"),
                                 evaluation.get("dataset_id") or evaluation.get("dataset")) if x]
    lines = ["## How to reproduce", "",
             "With vitconvert " + str(config.get("vitconvert", {}).get("version", "")).strip() + ":", "",
             "```bash", *commands, "```", ""]
    if not source:
        lines += ["The base model was converted from a module in memory (`vitconvert.apply(model, ...)`); the "
                  "command above rebuilds its architecture with random weights unless `--checkpoint` gives its "
                  "weights.", ""]
    if len(commands) > 1:
        lines += ["`DATA` is the data the model was trained and calibrated on"
                  + (f" ({', '.join(dict.fromkeys(datasets))})" if datasets else "")
                  + "; the held-out and evaluation images follow the rules in vitconvert's `data` module.", ""]
    return lines


# What each output of an exported graph holds (vitconvert.deploy); an output not named here is listed bare.
_OUTPUT_DOCS = {"logits": "(N, classes) class scores",
                "gmacs": "(N,) the GMACs of the path each image took",
                "exit": "(N,) int64, the stage that answered each image (0 = the first)",
                "granularity": "(N,) the share of its full-resolution queries each image kept (DGE; 1 = every region "
                               "at the finest granularity)"}
_OUTPUT_VARS = {"exit": "exits"}  # the snippet's variable names: not the builtin's
_PIL_FILTERS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
                "box": "BOX", "hamming": "HAMMING"}


def _preprocess_lines(data: dict[str, Any]) -> list[str]:
    """numpy/Pillow code for timm's evaluation transform with this data config, ending in ``pixel_values``.

    The resize and crop are torchvision's own arithmetic (what ``timm.data.create_transform`` runs), written out
    for a square input in the ``center`` (default) and ``squash`` crop modes; other layouts get a plain resize
    that says it is an approximation and names timm's transform.
    """
    _, height, width = (int(v) for v in data.get("input_size") or (3, 224, 224))
    crop_pct = _num(data.get("crop_pct")) or 0.875  # timm's default
    mode = data.get("crop_mode") or "center"
    interpolation = str(data.get("interpolation") or "bilinear")
    mean = ", ".join(repr(float(v)) for v in data.get("mean") or (0.485, 0.456, 0.406))
    std = ", ".join(repr(float(v)) for v in data.get("std") or (0.229, 0.224, 0.225))
    scale = math.floor(height / crop_pct)
    pil_filter = f"Image.Resampling.{_PIL_FILTERS.get(interpolation, 'BILINEAR')}"
    lines = ['image = Image.open("image.jpg").convert("RGB")']
    if height != width or mode not in ("center", "squash"):
        lines += [f"# approximately: timm.data.create_transform resizes and crops this model's data config "
                  f"(crop_mode {mode!r}, crop_pct {crop_pct:g}, {interpolation}) keeping the aspect ratio",
                  f"image = image.resize(({width}, {height}), {pil_filter})"]
    elif mode == "squash":
        lines += [f"# timm's evaluation transform: squash to {scale}x{scale} ({interpolation}), centre crop "
                  f"{height}x{width}, scale to [0, 1], normalise",
                  f"image = image.resize(({scale}, {scale}), {pil_filter})"]
    else:
        lines += [f"# timm's evaluation transform: shorter side to {scale} ({interpolation}), centre crop "
                  f"{height}x{width}, scale to [0, 1], normalise",
                  "w, h = image.size",
                  f"image = image.resize(({scale}, int({scale} * h / w)) if w <= h else (int({scale} * w / h), "
                  f"{scale}), {pil_filter})"]
    lines += [f"left, top = round((image.width - {width}) / 2), round((image.height - {height}) / 2)",
              f"image = image.crop((left, top, left + {width}, top + {height}))",
              f"mean, std = np.array([{mean}], np.float32), np.array([{std}], np.float32)",
              "pixel_values = ((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]",
              f"# (1, 3, {height}, {width}) float32; stack several images along axis 0"]
    return lines


def onnx_section(config: dict[str, Any], knobs: dict[str, float | None], outputs: list[str],
                 name: str | None = None) -> list[str]:
    """The "Run with ONNX Runtime" section of a card whose repository holds ``model.onnx``.

    Args:
        config: The model's config.json content (its data config gives the preprocessing).
        knobs: The graph's knob inputs with their stored defaults (:func:`vitconvert.deploy.onnx_interface`).
        outputs: The graph's output names, in order.
        name: ``OWNER/NAME`` of the repository; a bare name is written ``OWNER/<name>`` (default ``OWNER/NAME``).

    Example:
        >>> onnx_section(config, {"eta": 0.48}, ["logits", "gmacs", "exit"], "me/deit_small-cfvit")  # doctest: +SKIP
    """
    data = config.get("pretrained_cfg") or {}
    repo = _repo_ref(name or "NAME")
    point = (config.get("model_args", {}).get("state") or {}).get("point") or {}
    fixed = {k: v for k, v in point.items() if k not in knobs and _num(v) is not None}
    targets = ", ".join(_OUTPUT_VARS.get(o, o) if o.isidentifier() else f"out{i}" for i, o in enumerate(outputs))
    if len(outputs) == 1:
        targets += ","
    stored = ", ".join(f"{k} = {v:g}" for k, v in knobs.items() if v is not None)
    lines = [
        ONNX_HEADING,
        "",
        f"`{ONNX_NAME}` is this model as one ONNX graph with its dynamic path inside, exported by `vitconvert "
        "export` and checked against the PyTorch model before the upload (logits within 1e-4). It needs "
        "onnxruntime, numpy and Pillow, not torch; `vitconvert.load` and timm never download it.",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "from huggingface_hub import hf_hub_download",
        "from PIL import Image",
        "",
        f'session = ort.InferenceSession(hf_hub_download("{repo}", "{ONNX_NAME}"), '
        'providers=["CPUExecutionProvider"])',
        "",
        *_preprocess_lines(data),
        "",
        f'{targets} = session.run(None, {{"pixel_values": pixel_values}})'
        + (f"  # the stored point: {stored}" if stored else ""),
    ]
    if knobs:
        values = ", ".join(f'"{k}": np.array({v if v is not None else 0.5:g}, np.float32)' for k, v in knobs.items())
        other = "another " + next(iter(knobs)) if len(knobs) == 1 else "other values"
        lines.append(f'{targets} = session.run(None, {{"pixel_values": pixel_values, {values}}})  # or {other}')
    lines += ["```", ""]
    described = [f"`{o}` {_OUTPUT_DOCS[o]}" if o in _OUTPUT_DOCS else f"`{o}`" for o in outputs]
    _, height, width = (int(v) for v in data.get("input_size") or (3, 224, 224))
    lines.append(f"Input `pixel_values`: (N, 3, {height}, {width}) float32, any N. Outputs: " + "; ".join(described)
                 + ".")
    if knobs:
        lines[-1] += (" Each knob input (" + ", ".join(f"`{k}`" for k in knobs) + ") is a 0-dim float32 that "
                      "defaults to the stored value: leave it out, or pass another value to move the accuracy/GMACs "
                      "trade-off without exporting again.")
    if fixed:
        lines[-1] += " Fixed in the graph: " + ", ".join(f"`{k} = {v:g}`" for k, v in fixed.items()) + "."
    return [*lines, ""]


def set_onnx_section(card: str, section: list[str] | None) -> str:
    """The card with its "Run with ONNX Runtime" section replaced by ``section`` (removed when None).

    A card without one gets it before its Recipe section (the end when there is none), so a card written before
    the export (``save``, or by hand) describes the file a push uploads, and never one it does not.
    """
    lines = card.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == ONNX_HEADING), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    if section is None:
        return "\n".join(lines)
    where = start if start is not None else next((i for i, line in enumerate(lines) if line.strip() == "## Recipe"),
                                                 None)
    if where is None:
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join([*lines, "", *section])
    return "\n".join([*lines[:where], *section, *lines[where:]])
