"""The summary of an ablation study: mean +- standard error per variant, the gap to full MSCL, the
bars, the confusion matrices, and which groups of classes the errors fall between.

Everything here is a pure function of the finished rows (``runs/<variant>/seed<k>/row.json``), so a
study's table can be redrawn at any time without running anything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mscl_stream.errors import UserError

RANDOM_INIT = "random_init"
FULL = "full"
# Metrics carried into the table and the plot (fractions); the rows keep every metric eval returns.
HEADLINE = ("R@1", "R@5", "linear_top1")

def summarize(rows: list[dict], metrics: tuple[str, ...] = HEADLINE) -> list[dict]:
    """Per variant (in first-seen order): n seeds, and mean and standard error of each metric.

    The standard error is the sample standard deviation over seeds / sqrt(n) (NaN for one seed).
    """
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    table = []
    for name, rs in by.items():
        entry = {"variant": name, "n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for m in metrics:
            xs = [r[m] for r in rs if r.get(m) is not None]
            n = len(xs)
            mean = sum(xs) / n if n else math.nan
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
            entry[m] = {"mean": mean, "se": sd / math.sqrt(n) if n > 1 else math.nan, "values": xs}
        table.append(entry)
    return table


def gap_in_se(table: list[dict], name: str, metric: str = "R@1", ref: str = FULL) -> float:
    """(mean of ``name`` - mean of ``ref``) / sqrt(se_name^2 + se_ref^2): the gap in combined standard
    errors (NaN when either has fewer than two seeds, or for ``ref`` itself)."""
    by = {e["variant"]: e[metric] for e in table}
    if name == ref or name not in by or ref not in by:
        return math.nan
    a, b = by[name], by[ref]
    se = math.hypot(a["se"], b["se"])
    return (a["mean"] - b["mean"]) / se if se > 0 else math.nan


def markdown_table(table: list[dict], metrics: tuple[str, ...] = HEADLINE) -> str:
    """The summary as a Markdown table: mean +- standard error per metric with every seed's value in
    brackets, seeds per variant, and the R@1 gap to full MSCL in combined standard errors."""
    head = "| variant | seeds | " + " | ".join(metrics) + " | R@1 gap to full / combined SE |"
    lines = [head, "|" + " --- |" * (len(metrics) + 3)]
    for e in table:
        cells = []
        for m in metrics:
            s = e[m]
            vals = ", ".join(f"{v:.3g}" for v in s["values"])
            cells.append("-" if math.isnan(s["mean"]) else
                         f"{s['mean']:.3f}" + ("" if math.isnan(s["se"]) else f" +- {s['se']:.3f}")
                         + (f" ({vals})" if len(s["values"]) > 1 else ""))
        gap = gap_in_se(table, e["variant"]) if "R@1" in e else math.nan
        lines.append(f"| {e['variant']} | {e['n']} | " + " | ".join(cells)
                     + f" | {'' if math.isnan(gap) else f'{gap:+.1f}'} |")
    return "\n".join(lines) + "\n"


# Groups of classes whose confusions say what an encoder has not learnt, per sample task (keyed by its
# class names as the manifest numbers them: sorted). A pair (A, B) counts the queries of A whose nearest
# training video is in B, and of B whose nearest is in A; (A, A) counts confusions within A.
_DIRECTION_GROUPS = (
    ("horizontal <-> up/down", ("horizontal",), ("up", "down")),
    ("up <-> down", ("up",), ("down",)),
    ("moving <-> still", ("horizontal", "up", "down"), ("still",)),
)
_ONE = ("steady", "oscillate", "stop_go")
_TWO = ("pair_same", "pair_opposite")
_MOTION_GROUPS = (
    ("moving <-> still", ("pan", *_ONE, *_TWO), ("still",)),
    ("whole frame <-> parts", ("pan",), (*_ONE, *_TWO)),
    ("one part <-> two parts", _ONE, _TWO),
    ("among one-part speed profiles", _ONE, _ONE),
    ("same <-> opposite", ("pair_same",), ("pair_opposite",)),
)
CONFUSION_GROUPS = {frozenset(("horizontal", "up", "down", "still")): _DIRECTION_GROUPS,
                    frozenset(("still", "pan", *_ONE, *_TWO)): _MOTION_GROUPS}


def group_confusions(counts: list[list[int]], classes: list[str], groups) -> list[tuple[str, int, float]]:
    """(group name, confusions, chance) per group of ``counts`` (query class x nearest class, summed over
    seeds). Chance: what an encoder blind to motion makes, each query's nearest class drawn uniformly
    (the sample data's classes are balanced)."""
    idx = {c: i for i, c in enumerate(classes)}
    per_class = [sum(row) for row in counts]
    out = []
    for name, a, b in groups:
        pairs = {(idx[i], idx[j]) for i in a for j in b if i != j} | {(idx[j], idx[i]) for i in a for j in b if i != j}
        got = sum(counts[i][j] for i, j in pairs)
        chance = sum(per_class[i] / len(classes) for i, j in pairs)
        out.append((name, got, chance))
    return out


def group_confusion_table(by_variant: dict[str, dict]) -> str:
    """Markdown: per variant (from :func:`confusion_by_variant`), the confusions between the task's class
    groups with their chance counts; empty when the classes are not a known sample task's."""
    if not by_variant:
        return ""
    classes = next(iter(by_variant.values()))["classes"]
    groups = CONFUSION_GROUPS.get(frozenset(classes))
    if groups is None:
        return ""
    lines = ["| variant | seeds | " + " | ".join(g[0] for g in groups) + " |",
             "|" + " --- |" * (len(groups) + 2)]
    for name, e in by_variant.items():
        cells = [f"{got} (chance {chance:.0f})" for _, got, chance in group_confusions(e["counts"], classes, groups)]
        lines.append(f"| {name} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, metrics: tuple[str, ...] = HEADLINE) -> None:
    """Bars of the mean per variant and metric, +- one standard error, every seed as a dot, and a dashed
    line at the untrained encoder's mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * len(table) + 1.5),
                             squeeze=False)
    names = [e["variant"] for e in table]
    for ax, m in zip(axes[0], metrics):
        means = [e[m]["mean"] for e in table]
        ses = [0 if math.isnan(e[m]["se"]) else e[m]["se"] for e in table]
        ax.barh(range(len(table)), means, xerr=ses, color="#c8cde8", ecolor="#555", capsize=3)
        for i, e in enumerate(table):
            ax.plot(e[m]["values"], [i] * len(e[m]["values"]), "o", color="#c33", ms=4, zorder=3)
        floor = next((e[m]["mean"] for e in table if e["variant"] == RANDOM_INIT), None)
        if floor is not None and not math.isnan(floor):
            ax.axvline(floor, color="#999", ls="--", lw=1)     # the untrained encoder's mean
        ax.set_yticks(range(len(table)), names if ax is axes[0][0] else [""] * len(table))
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(m)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def confusion_by_variant(rows: list[dict]) -> dict[str, dict]:
    """Per variant (first-seen order, rows without a confusion left out): the top-1 confusion counts
    summed over seeds, the class names and the seeds summed."""
    by: dict[str, dict] = {}
    for r in rows:
        if "top1_confusion" not in r:
            continue
        entry = by.setdefault(r["variant"], {"classes": r["classes"], "counts": None, "seeds": []})
        if entry["classes"] != r["classes"]:
            raise UserError(f"ablate: {r['variant']} seed {r['seed']} has classes {r['classes']}, "
                            f"other seeds {entry['classes']}")
        c = r["top1_confusion"]
        entry["counts"] = c if entry["counts"] is None else [[a + b for a, b in zip(x, y)]
                                                             for x, y in zip(entry["counts"], c)]
        entry["seeds"].append(r["seed"])
    return by


def plot_confusion(rows: list[dict], path: Path) -> None:
    """One top-1 confusion matrix per variant (summed over seeds), each row as a fraction of its queries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = confusion_by_variant(rows)
    cols = min(5, len(by))
    nrows = -(-len(by) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.7 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(by):]:
        ax.axis("off")
    for ax, (name, e) in zip(axes.flat, by.items()):
        counts = e["counts"]
        frac = [[x / max(sum(row), 1) for x in row] for row in counts]
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        n = len(e["classes"])
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i][j] > 0.5 else "black")
        ax.set_xticks(range(n), e["classes"], fontsize=6, rotation=45)
        ax.set_yticks(range(n), e["classes"], fontsize=6)
        ax.set_title(f"{name} ({len(e['seeds'])} seeds)", fontsize=8)
    fig.supxlabel("class of the nearest training video", fontsize=8)
    fig.supylabel("query class", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
