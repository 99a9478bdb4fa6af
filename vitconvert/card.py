"""Model cards for converted models (README.md with Hub front matter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vitconvert.backbones import describe_family


def front_matter(config: dict[str, Any]) -> dict[str, Any]:
    """Hub metadata: library, tags, lineage (base_model), license, datasets, metrics."""
    info = config.get("vitconvert", {})
    base = config["model_args"]["base"]
    pretrained_cfg = config.get("pretrained_cfg", {})
    meta: dict[str, Any] = {
        "library_name": "timm",
        "tags": ["image-classification", "timm", "vitconvert", info.get("method", ""), info.get("family", "")],
        "license": pretrained_cfg.get("license") or "apache-2.0",
        "pipeline_tag": "image-classification",
    }
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    calibration = config["model_args"].get("state", {}).get("calibration", {})
    if calibration.get("dataset"):
        meta["datasets"] = [calibration["dataset"]]
        meta["metrics"] = ["accuracy"]
    return meta


def model_card(config: dict[str, Any], folder: Path | None = None, name: str | None = None) -> str:
    """Render README.md for a converted model config (``folder`` holds files it may link, like curve.png)."""
    info = config.get("vitconvert", {})
    args = config["model_args"]
    base, recipe, state = args["base"], args["recipe"], args.get("state", {})
    method = info.get("method", "")
    name = name or (folder.name if folder is not None else f"{base['architecture']}-{method}")
    lines = [
        "---",
        yaml.safe_dump(front_matter(config), sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"`{base['architecture']}` ({describe_family(info.get('family', ''))}) converted by "
        f"[vitconvert](https://github.com/) with the `{recipe['name']}` recipe: {recipe.get('description', '')}.",
        "",
        f"- Base model: `{base.get('source') or base['architecture']}`"
        + (f" (Hub: `{base['hub_id']}`)" if base.get("hub_id") else ""),
        f"- Method: `{method}`; operating point: `{info.get('knob', 'knob')} = {state.get(info.get('knob', ''), '')}`",
        f"- Base model GMACs: {state.get('base_gmacs', 0):.3f}; fine-tuned: {'yes' if state.get('finetuned') else 'no'}",
        "",
    ]
    curve = state.get("curve") or []
    if curve:
        cal = state.get("calibration", {})
        lines += [
            "## Operating points",
            "",
            f"Measured on {cal.get('images', '?')} held-out images ({cal.get('split', 'held-out split')}); "
            f"base model top-1 {cal.get('base_top1', float('nan')):.2f}.",
            "",
            "| knob | top-1 | expected GMACs | share of base GMACs |",
            "|---|---|---|---|",
        ]
        base_gmacs = state.get("base_gmacs") or 1.0
        step = max(1, len(curve) // 12)
        for p in curve[::step]:
            lines.append(f"| {p['knob']:g} | {p['top1']:.2f} | {p['gmacs']:.3f} | {p['gmacs'] / base_gmacs:.0%} |")
        lines.append("")
    if folder is not None and (folder / "curve.png").exists():
        lines += ["![accuracy against GMACs](curve.png)", ""]
    lines += [
        "## How to load",
        "",
        "```python",
        "import vitconvert, timm",
        f"model = vitconvert.load('hf-hub:OWNER/{name}')            # or budget='50%'",
        f"model = timm.create_model('hf-hub:OWNER/{name}', pretrained=True)  # after import vitconvert",
        "```",
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
