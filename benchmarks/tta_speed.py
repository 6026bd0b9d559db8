"""Test-time prompt tuning (TPT) speed: our batched adaptation vs a one-image-at-a-time loop like the reference code.

Same model, same views, same settings (64 views, 10% kept, one AdamW step at lr 5e-3, weight decay 0.01, episodic
reset, prediction from view 0). In one run and on one machine, per config, each case in its own process (so peak
memory is that case's own):
  R. the reference loop (azshue/TPT ``tpt_classification.py``, rewritten below in :func:`reference_tpt`): one image
     at a time; every step re-encodes all views and the text of all classes at the full context length;
  O. ours: ``get_tta_method("tpt")(model, TTAConfig(...)).adapt(views)`` on batches of B images;
  F. the floor for ours: encode each image's views once (no grad, B images at a time as ours does) + the text work
     no batching can share (each image's own prompt over all C classes: text forward + backward, and the final
     forward, at the truncated length, in chunks of ours' size but never recomputed; so O / F also shows what
     ours' chunk checkpointing under a memory budget costs).
It reports s/image, R / O (speed-up), O / F, peak memory, and checks that both paths predict the same classes
(argmax) with max |logit difference|; the run exits with status 1 on any mismatch.

Peak memory is the process's resident high-water mark (VmHWM, i.e. ``getrusage`` ``ru_maxrss``; it counts torch's
CPU allocations, which tracemalloc does not see), reset after the model and views are built where the kernel allows
(/proc/self/clear_refs), so it is the high-water mark of the timed work with the model and views resident.

    python benchmarks/tta_speed.py --config world          # embedded world teacher, 64 shapes classes, real images
    python benchmarks/tta_speed.py --config vit37          # random-weight ViT-B/16, 224 px, 37 ImageNet names
    python benchmarks/tta_speed.py --config all            # world, vit37, vit200, vit1000 (ours only, 8 GB budget)
    python benchmarks/tta_speed.py --quick                 # smoke run (world, 16 views, 4 images): < 1 min
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch

#: per config: backbone, class count, test images, batch (ours), views; ``quick`` overrides for the smoke run
CONFIGS: dict[str, dict] = {
    "world": {
        "model": "pkd-world-teacher",
        "pretrained": "shipped",
        "classes": 64,
        "images": 32,
        "batch": 8,
        "views": 64,
        "reference": True,
        "text_memory_mb": 1024.0,
        "quick": {"images": 4, "batch": 2, "views": 16},
    },
    "vit37": {
        "model": "ViT-B-16",
        "pretrained": "random",
        "classes": 37,
        "images": 8,
        "batch": 8,
        "views": 64,
        "reference": True,
        "text_memory_mb": 1024.0,
        "quick": {"images": 1, "batch": 1, "views": 8, "warmup": 0},
    },
    "vit200": {
        "model": "ViT-B-16",
        "pretrained": "random",
        "classes": 200,
        "images": 8,
        "batch": 8,
        "views": 64,
        "reference": True,
        "text_memory_mb": 1024.0,
        "quick": {"images": 1, "batch": 1, "views": 8, "warmup": 0, "classes": 50},
    },
    "vit1000": {
        "model": "ViT-B-16",
        "pretrained": "random",
        "classes": 1000,
        "images": 2,
        "batch": 2,
        "views": 64,
        "reference": False,  # > 24 GB: its full-length 1000-class text graph; its memory is estimated instead
        "text_memory_mb": 2048.0,
        "memory_limit_mb": 8192.0,
        "quick": {"images": 1, "batch": 1, "views": 8, "warmup": 0, "classes": 100, "text_memory_mb": 64.0},
    },
}
ORDER = ("world", "vit37", "vit200", "vit1000")

#: activations kept per token, per text block, in units of the text width (the project's own model, tta/model.py)
_ACTIVATION_FLOATS_PER_WIDTH = 16


# --- the reference-style loop ---------------------------------------------------------------------------------------
def reference_tpt(model, views: torch.Tensor, *, steps: int, selection: float, lr: float, weight_decay: float):
    """TPT on ONE image as the reference code does it; views [V, 3, H, W] (view 0 the original) -> logits [C].

    Follows azshue/TPT ``tpt_classification.py`` (``test_time_adapt_eval`` + ``test_time_tuning``) with
    ``ClipTestTimeTuning``:
    - ``model.reset()`` puts the context back to its initial value and ``optimizer.load_state_dict(optim_state)``
      restores the untouched AdamW state: here, a fresh ctx leaf and a fresh ``AdamW(lr, weight_decay)``;
    - every step runs the model's forward on all V views: image features under ``no_grad`` (recomputed every step),
      then the prompt learner + text encoder over all C classes at the FULL context length (77 tokens for CLIP; the
      reference never truncates) with gradients; logits = logit_scale · img @ txt.T;
    - at step 0 ``select_confident_samples`` keeps the int(V · 0.1) lowest-entropy views and later steps reuse those
      indices; the loss is ``avg_entropy`` (the marginal entropy H(p̄)); backward; optimiser step;
    - the prediction runs the forward again on view 0 (image + full-length text of all classes, no grad).
    We use the project's ``marginal_entropy`` / ``view_entropy`` (the same formulas) and a stable argsort (the
    reference's ``torch.argsort`` is not stable; ties between float entropies do not happen in practice).
    """
    from promptkd.tta.losses import marginal_entropy, view_entropy

    learner, encoder = model.learner, model.text_encoder
    token_ids = learner.token_ids  # [C, L] at the tokenizer's full context length
    ctx = model.base["ctx"].clone().requires_grad_(True)  # model.reset()
    optimizer = torch.optim.AdamW([ctx], lr=lr, weight_decay=weight_decay)  # load_state_dict(optim_state)
    n_keep = max(1, int(views.shape[0] * selection))

    def text_features():
        with model.backbone.autocast():
            return encoder(learner.build(ctx), token_ids, truncate=False, normalize=True).float()

    selected = None
    for _ in range(steps):
        with torch.no_grad():
            image = model.encode_images(views)  # [V, E]
        logits = model.logit_scale * image @ text_features().t()  # [V, C]
        if selected is None:
            selected = torch.argsort(view_entropy(logits.detach()), stable=True)[:n_keep]
        loss = marginal_entropy(logits[selected].unsqueeze(0))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        image = model.encode_images(views[:1])
        return (model.logit_scale * image @ text_features().t())[0]


# --- building a config --------------------------------------------------------------------------------------------
def _classnames(settings: dict) -> list[str]:
    n = settings["classes"]
    if settings["model"].startswith("pkd-world"):
        from promptkd.data.datasets import resolve_dataset

        names = resolve_dataset("shapes", settings["world_root"]).classnames
    else:
        # ImageNet names (the CLIP-curated list TPT uses too) so that prompt token lengths are realistic
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    if n > len(names):
        raise SystemExit(f"{settings['name']}: {n} classes asked, {len(names)} available")
    return list(names[:n])


def _views(settings: dict, size: int, preprocess) -> torch.Tensor:
    """[N, V, 3, S, S]: real world images through TPT's views (world) or seeded random tensors (ViT-B/16)."""
    n, v = settings["images"] + settings["warmup"], settings["views"]
    if settings["model"].startswith("pkd-world"):
        from promptkd.data.datasets import resolve_dataset
        from promptkd.tta.views import TTAViewDataset, ViewConfig

        test = resolve_dataset("shapes", settings["world_root"]).test
        step = max(1, len(test) // n)
        dataset = TTAViewDataset(test[::step][:n], preprocess, ViewConfig(n_views=v, augmix=False, seed=0))
        return torch.stack([dataset[i][0] for i in range(n)])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, v, 3, size, size, generator=generator)


def _build(settings: dict):
    from promptkd.backbones import load_backbone
    from promptkd.tta.model import build_model

    torch.manual_seed(0)
    backbone = load_backbone(settings["model"], settings["pretrained"])
    model, _ = build_model(
        _classnames(settings),
        backbone=backbone,
        init="a photo of a",
        n_ctx=4,
        text_memory_mb=settings["text_memory_mb"],
    )
    views = _views(settings, backbone.image_size, backbone.preprocess)
    return model, views


def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0); False when the kernel or sandbox refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_kb("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _batches(n: int, size: int, offset: int) -> list[slice]:
    return [slice(offset + i, offset + min(n, i + size)) for i in range(0, n, size)]


# --- one case in its own process ----------------------------------------------------------------------------------
def _case(queue, case: str, settings: dict) -> None:
    torch.set_num_threads(settings["threads"])
    from promptkd.tta.base import TTAConfig, get_tta_method

    model, views = _build(settings)
    warm, n, steps = settings["warmup"], settings["images"], settings["steps"]
    cfg = TTAConfig(n_views=settings["views"], steps=steps)
    out: dict = {"case": case, "loaded_rss_mb": (_status_kb("VmRSS") or 0) / 1024, "text": _text_shape(model, settings)}
    logits: list[torch.Tensor] = []

    if case == "reference":
        kwargs = {"steps": steps, "selection": cfg.selection, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        out["peak_reset"] = _reset_peak()
        for i in range(warm):
            reference_tpt(model, views[i], **kwargs)
        start = time.perf_counter()
        for i in range(warm, warm + n):
            logits.append(reference_tpt(model, views[i], **kwargs).unsqueeze(0))
        out["seconds"] = time.perf_counter() - start
    elif case == "ours":
        method = get_tta_method("tpt")(model, cfg)
        out["peak_reset"] = _reset_peak()
        start = time.perf_counter()
        model.initial_text_features()  # once per class list, shared by every test image (cached on the model)
        out["class_list_seconds"] = time.perf_counter() - start
        if warm:
            method.adapt(views[:warm])
        start = time.perf_counter()
        for rows in _batches(n, settings["batch"], warm):
            logits.append(method.adapt(views[rows]).logits)
        out["seconds"] = time.perf_counter() - start
    elif case == "floor":
        # each image's own text at the truncated length, in class chunks of ours' size, never recomputed: with a
        # loss that is a sum over classes each chunk can run its backward at once (the real entropy loss couples the
        # classes, which is why ours checkpoints chunks: that recomputation is not part of the floor)
        learner, encoder, length = model.learner, model.text_encoder, model.learner.eot_length
        n_cls, per_chunk = learner.n_classes, model._plan().sequences_per_chunk
        chunks = [slice(c, min(n_cls, c + per_chunk)) for c in range(0, n_cls, per_chunk)]

        def own_text(ctx: torch.Tensor, backward: bool) -> None:
            for classes in chunks:
                with model.backbone.autocast():
                    embeddings = learner.build(ctx, classes=classes, length=length)
                    features = encoder(embeddings, learner.token_ids[classes, :length], normalize=True).float()
                if backward:
                    features.sum().backward()  # the backward costs the same whatever the loss

        out["peak_reset"] = _reset_peak()

        def floor_batch(rows: slice, parts: dict) -> None:
            tic = time.perf_counter()
            with torch.no_grad():
                model.encode_images(views[rows].flatten(0, 1))
            toc = time.perf_counter()
            for _ in range(rows.stop - rows.start):
                ctx = model.base["ctx"].clone().requires_grad_(True)
                for _ in range(steps):
                    own_text(ctx, backward=True)
                with torch.no_grad():
                    own_text(ctx, backward=False)
            parts["image"] += toc - tic
            parts["text"] += time.perf_counter() - toc

        scratch = {"image": 0.0, "text": 0.0}
        if warm:
            floor_batch(slice(0, warm), scratch)
        parts = {"image": 0.0, "text": 0.0}
        for rows in _batches(n, settings["batch"], warm):
            floor_batch(rows, parts)
        out["seconds"] = parts["image"] + parts["text"]
        out["image_seconds"], out["text_seconds"] = parts["image"], parts["text"]
    out["seconds_per_image"] = out["seconds"] / n
    out["peak_rss_mb"] = _peak_mb()
    if logits:
        out["logits"] = torch.cat(logits).tolist()
    queue.put(out)


def run_case(case: str, settings: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_case, args=(queue, case, settings))
    process.start()
    try:
        result = queue.get()
    except KeyboardInterrupt:
        process.terminate()
        raise
    process.join()
    return result


# --- report -------------------------------------------------------------------------------------------------------
def _text_shape(model, settings: dict) -> dict:
    """Text tower facts: context length (reference), truncated length (ours), depth, width, ours' chunk size."""
    return {
        "context": int(model.learner.token_ids.shape[1]),
        "eot_length": int(model.learner.eot_length),
        "blocks": int(model.text_encoder.n_blocks),
        "width": int(model.text_encoder.width),
        "sequences_per_chunk": model._plan().sequences_per_chunk,
    }


def estimate_reference_text_mb(shape: dict, classes: int) -> float:
    """The reference's text graph for one step: C sequences at the full context length, all kept for backward."""
    per_sequence = shape["context"] * shape["blocks"] * shape["width"] * _ACTIVATION_FLOATS_PER_WIDTH * 4
    return classes * per_sequence / 2**20


def run_config(name: str, args) -> dict:
    settings = dict(CONFIGS[name])
    quick = settings.pop("quick")
    settings.update({"warmup": 1, "steps": args.steps})
    if args.quick:
        settings.update(quick)
    for key in ("images", "batch", "views", "classes", "text_memory_mb", "warmup"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings.update({"name": name, "threads": args.threads, "world_root": args.world_root})
    settings["batch"] = min(settings["batch"], settings["images"])
    run_reference = settings["reference"] and not args.no_reference
    print(
        f"\n## {name}: {settings['model']} ({settings['pretrained'] or 'random weights'}), {settings['classes']} "
        f"classes, {settings['views']} views, {settings['images']} images, batch {settings['batch']} (ours), "
        f"{settings['steps']} step(s), {settings['warmup']} warm-up image(s)",
        flush=True,
    )
    cases = (["reference"] if run_reference else []) + ["ours", "floor"]
    results = {case: run_case(case, settings) for case in cases}
    shape = results["ours"]["text"]
    print(
        f"text: context {shape['context']} tokens (reference), truncated to {shape['eot_length']} (ours), "
        f"{shape['blocks']} blocks of width {shape['width']}; ours' text budget {settings['text_memory_mb']:.0f} MB "
        f"= {shape['sequences_per_chunk']} sequences per chunk"
    )
    ours, floor = results["ours"], results["floor"]
    reference = results.get("reference")

    labels = {
        "reference": "R. reference loop (1 image at a time, full-length text)",
        "ours": f"O. ours, batched (B = {settings['batch']})",
        "floor": "F. floor: views encoded once + per-image text fwd/bwd/fwd",
    }
    print("\n| case | s/image | vs reference | peak RSS (MB) | loaded RSS (MB) |\n|---|---|---|---|---|")
    for case, r in results.items():
        speed = f"{reference['seconds_per_image'] / r['seconds_per_image']:.2f}x" if reference else "n/a"
        print(
            f"| {labels[case]} | {r['seconds_per_image']:.3f} | {speed} | {r['peak_rss_mb']:.0f} | "
            f"{r['loaded_rss_mb']:.0f} |"
        )
    if not all(r.get("peak_reset") for r in results.values()):
        print("(the kernel refused to reset the peak: peak RSS includes building the model)")
    summary: dict = {
        "config": name,
        "settings": {k: v for k, v in settings.items() if k != "world_root"},
        "text": shape,
        "results": {c: {k: v for k, v in r.items() if k not in ("logits", "text")} for c, r in results.items()},
        "ours_over_floor": ours["seconds_per_image"] / floor["seconds_per_image"],
    }
    print(
        f"\nO / F = {summary['ours_over_floor']:.3f} (floor: image {floor['image_seconds'] / settings['images']:.3f} "
        f"+ text {floor['text_seconds'] / settings['images']:.3f} s/image); ours' one-time class-list text features "
        f"{ours['class_list_seconds']:.3f} s (once per class list, not in s/image)"
    )
    if reference:
        summary["speedup"] = reference["seconds_per_image"] / ours["seconds_per_image"]
        ref_logits, our_logits = torch.tensor(reference["logits"]), torch.tensor(ours["logits"])
        same = (ref_logits.argmax(-1) == our_logits.argmax(-1)).tolist()
        top2 = our_logits.topk(2, dim=-1).values
        summary.update(
            {
                "predictions_identical": all(same),
                "max_abs_logit_diff": float((ref_logits - our_logits).abs().max()),
                "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min()),
            }
        )
        verdict = "identical" if all(same) else f"MISMATCH on {same.count(False)} image(s)"
        print(
            f"R / O = {summary['speedup']:.2f}x speed-up; predictions {verdict} ({sum(same)}/{len(same)}); "
            f"max |logit diff| = {summary['max_abs_logit_diff']:.2e} (smallest top-1 - top-2 margin "
            f"{summary['min_top2_margin']:.2e})"
        )
    estimate = estimate_reference_text_mb(shape, settings["classes"])
    summary["reference_text_estimate_mb"] = estimate
    measured = f", measured peak {reference['peak_rss_mb']:.0f} MB" if reference else " (not run)"
    print(
        f"reference text graph estimate: {estimate:,.0f} MB ({settings['classes']} classes x {shape['context']} "
        f"tokens x {shape['blocks']} blocks x width {shape['width']} x {_ACTIVATION_FLOATS_PER_WIDTH} floats) + model "
        f"and views{measured}"
    )
    limit = settings.get("memory_limit_mb")
    if limit:
        within = ours["peak_rss_mb"] <= limit
        summary["within_memory_limit"] = within
        print(f"ours peak {ours['peak_rss_mb']:.0f} MB {'within' if within else 'OVER'} the {limit:.0f} MB limit")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*ORDER, "all"], default="world")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (few views and images), under a minute")
    parser.add_argument("--images", type=int, default=None, help="test images per config (timed)")
    parser.add_argument("--batch", type=int, default=None, help="images per batched adaptation (ours)")
    parser.add_argument("--views", type=int, default=None, help="views per image (TPT: 64)")
    parser.add_argument("--classes", type=int, default=None, help="override the config's class count")
    parser.add_argument("--text-memory-mb", type=float, default=None, help="PromptedCLIP text_memory_mb (ours)")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps per image (TPT: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up images per case (default 1)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--world-root", default=os.path.expanduser("~/.cache/promptkd/world"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, {args.threads} threads, torch "
        f"{torch.__version__}, fp32, CPU{' (quick smoke run)' if args.quick else ''}"
    )
    names = ORDER if args.config == "all" else (args.config,)
    summaries = [run_config(name, args) for name in names]
    measured = {s["config"]: s for s in summaries if "reference" in s["results"]}
    if "vit37" in measured and "vit200" in measured and "vit1000" in names:
        # linear in the class count: extrapolate the measured reference peaks to 1000 classes
        lo, hi = measured["vit37"], measured["vit200"]
        c_lo, c_hi = lo["settings"]["classes"], hi["settings"]["classes"]
        p_lo, p_hi = lo["results"]["reference"]["peak_rss_mb"], hi["results"]["reference"]["peak_rss_mb"]
        slope = (p_hi - p_lo) / max(1, c_hi - c_lo)
        big = next(s for s in summaries if s["config"] == "vit1000")
        c_big = big["settings"]["classes"]
        big["reference_peak_extrapolated_mb"] = p_hi + slope * (c_big - c_hi)
        print(
            f"\nreference loop at {c_big} classes (not run): ~{big['reference_peak_extrapolated_mb']:,.0f} MB peak, "
            f"extrapolated from its measured peaks at {c_lo} and {c_hi} classes ({slope:.1f} MB per class)"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "configs": summaries}, handle, indent=2)
    if any(s.get("predictions_identical") is False for s in summaries):
        sys.exit(1)


if __name__ == "__main__":
    main()
