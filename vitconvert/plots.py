"""Pictures of results: the accuracy/GMACs curve calibration measures and evaluation adds its points to.

Drawn on a bare Agg canvas and returned as PNG bytes, so the caller's matplotlib backend is left alone and the
caller decides where the picture goes (a model folder, written atomically with the model).
"""

from __future__ import annotations

import io

from vitconvert.operating import CurvePoint, format_point


def plot_curve(curve: list[CurvePoint], base_gmacs: float, base_top1: float | None, *, chosen: CurvePoint | None = None,
               measured: list[CurvePoint] | None = None, measured_base: float | None = None,
               title: str = "", curve_label: str = "calibration curve", measured_label: str = "measured") -> bytes:
    """PNG of top-1 against expected GMACs: the curve, the chosen/measured point and the base model.

    Drawn on a bare Agg canvas, so the caller's matplotlib backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if curve:
        pts = sorted(curve, key=lambda p: p.gmacs)
        ax.plot([p.gmacs for p in pts], [p.top1 for p in pts], "-o", ms=2.5, lw=1.2, color="tab:blue",
                label=curve_label)
    if chosen is not None:
        ax.plot([chosen.gmacs], [chosen.top1], "o", ms=8, mfc="none", mew=1.8, color="tab:orange",
                label=f"chosen point ({format_point(chosen.point)})")
    for i, p in enumerate(measured or []):
        ax.plot([p.gmacs], [p.top1], "*", ms=13, color="tab:red", label=measured_label if i == 0 else None)
    calib_label = "base model (calibration images)" if measured_base is not None else "base model"
    for top1, label, color in ((base_top1, calib_label, "black"), (measured_base, "base model (measured)", "tab:gray")):
        if top1 is not None:
            ax.plot([base_gmacs], [top1], "s", ms=8, color=color, label=f"{label}: {top1:.2f}%")
    ax.axvline(base_gmacs, color="black", lw=0.6, ls=":")
    ax.set_xlabel("expected GMACs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
